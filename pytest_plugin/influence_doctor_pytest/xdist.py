"""pytest-xdist scheduling that keeps each pipeline's items on one worker.

Imported only under `--influence-check -n N`. A pipeline's items have node ids `<pipeline>::<stage>`:
grouping them by `<pipeline>` sends them to one worker, which diagnoses the pipeline once and answers
every item from that diagnosis. Every other test is its own group, balanced as `--dist load` would.
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling


class PipelineScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        head = nodeid.split("::", 1)[0]
        if "::" in nodeid and not head.endswith(".py") and "/" not in head:
            return head  # a pipeline item: <pipeline>::<stage>
        return nodeid
