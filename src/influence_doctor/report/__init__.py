"""Turning a finished run into report.json, report.md, report.html and terminal text, with the settings to
use (`prescription.py`); `write.py` decides the verdict and writes the files."""
