"""A Serve request router that sends a call to the model-worker replica the scheduler chose.

Ray Serve's handles pick replicas themselves (power of two choices by default). Here the decision is the
scheduler deployment's, so the worker deployment is configured with this router and the caller names the
replica: ``worker.submit.remote(work, channel, replica=<unique id>)``. The router runs inside the caller's
process, so pinning costs no extra hop.

A pinned replica this handle does not know yet (it started a moment ago) is waited for, up to ``pin_wait_s``;
after that the call goes to any replica, and the worker, seeing it was not the one named, refuses it, so the
caller can ask the scheduler again. Calls without ``replica=`` go to any replica.

The router also publishes which replicas Serve's controller currently routes to (``replica_events``). A replica
being stopped (scale-down, redeploy) leaves that set before it drains, which is the earliest signal Serve gives
anywhere; the scheduler uses it to stop routing to such a worker.
"""

from __future__ import annotations

import time
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from gpt2serve.actors import replica_events

PIN_KWARG = "replica"


class PinnedReplicaRouter(RequestRouter):
    pin_wait_s: float = 1.0

    def initialize_state(self, pin_wait_s: float = 1.0, **kwargs) -> None:
        self.pin_wait_s = pin_wait_s

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        replica_events.publish(self._deployment_id.app_name, self._deployment_id.name,
                               {r.replica_id.unique_id for r in replicas})

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        target = pending_request.kwargs.get(PIN_KWARG) if pending_request is not None else None
        if target is None:
            return [candidate_replicas]
        # Without this, a pinned replica that is momentarily full would be retried in a tight loop.
        pending_request.routing_context.should_backoff = True
        for replica in candidate_replicas:
            if replica.replica_id.unique_id == target:
                return [[replica]]
        if time.time() - pending_request.created_at < self.pin_wait_s:
            return []  # not known yet: back off and look again
        return [candidate_replicas]  # gone: the replica that gets it refuses it (it is not ``target``)
