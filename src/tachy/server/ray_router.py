"""Ray Serve request router for tachy replicas: a conversation stays on one replica, the rest go to the least
loaded one.

A conversation is named by the ``X-Session-Id`` header (Ray Serve's session header; the HTTP proxy puts it in
the request's metadata, the only part of a request a router sees before the body is read). Its replica is
chosen by rendezvous hashing over the live replicas: every router process (one per node's proxy) picks the
same replica without sharing state, only the conversations of a replica that goes away move, and a
conversation moves to the next replica in its order when its own is full. Requests without a session go to
the replica with the fewest requests in flight (the base router probes queue lengths within a rank).
"""
from __future__ import annotations

import hashlib
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_PATH = f"{__name__}.ConversationRouter"


def rendezvous_order(key: str, replica_ids: list[str]) -> list[str]:
    """``replica_ids`` by descending hash of (key, replica): the conversation's replica first."""
    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{rid}".encode(), digest_size=8).digest()
    return sorted(replica_ids, key=weight, reverse=True)


class ConversationRouter(RequestRouter):
    """Session affinity by rendezvous hashing; least loaded for requests without a session. (No FIFOMixin:
    the replica found for a request must go to that request, not to the oldest one waiting.)"""

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True   # all full: wait between rounds, not spin
        if not session or not candidate_replicas:
            return [candidate_replicas]   # one rank: the base class sends it to the shortest queue there
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rid]] for rid in rendezvous_order(session, list(by_id))]
