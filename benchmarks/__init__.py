"""Benchmarks of the doctor: each module runs as a script (`python benchmarks/overhead.py`), the calibration as a
package (`python -m benchmarks.calibration`)."""
