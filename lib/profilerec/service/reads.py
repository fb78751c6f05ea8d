"""How an ingress replica reads the profile shards, fastest way first.

A recommendation for a user whose packed state is on their shard's board (profile_board.py: the
node's shared memory) is scored by the replica itself, with its own copy of the recommender; a
read the board cannot answer goes to the shard over its local read socket (read_channel.py) when
the shard runs on this node, else through a Ray actor call, which also waits for a restarting
shard. A shard whose socket closed or whose board's writer died is looked up again on the next read.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import ray
from profilerec.config import ServeConfig
from profilerec.data.learned import VectorLog
from profilerec.model.recommend import Recommender
from profilerec.service.profile_board import BoardReader
from profilerec.service.read_channel import ChannelClosed, ReadClient
from profilerec.service.shard import recommendation, shard_of, state_codec

log = logging.getLogger(__name__)


class ShardReads:
    """The read path of one ingress replica to the shards of its application."""

    def __init__(self, shards: list[Any], cfg: ServeConfig, recommender: Recommender, items_log: VectorLog,
                 catch_up: Callable[[], None]):
        """`shards`: the shard actors' handles; `recommender`: the replica's, kept up to date with
        `items_log` (the items learned while serving) by `catch_up`."""
        self.shards = shards
        self.num_shards = cfg.num_shards
        self.read_wait_s = cfg.read_wait_ms / 1000
        self.recommender = recommender
        self.codec = state_codec(recommender)
        self.items_log = items_log
        self.catch_up = catch_up
        self.readers: dict[int, Optional[ReadClient]] = {}  # shard -> its read socket (None: another node)
        self.boards: dict[int, BoardReader] = {}  # shard -> its board, when on this node and on
        self.board_misses: dict[int, int] = {}  # shard -> the board fingerprint this replica could not match
        self.counts = {"board": 0, "shard": 0}  # recommendation reads answered each way

    async def recommend(self, user_id: str, k: int, exclude_seen: bool, brand: Optional[str],
                        category: Optional[str]) -> dict[str, Any]:
        """The recommendation answer for the user (see shard.recommendation)."""
        answer = self._recommend_from_board(user_id, k, exclude_seen, brand, category)
        self.counts["shard" if answer is None else "board"] += 1
        if answer is None:
            answer = await self._read("recommend", user_id, k=k, exclude_seen=exclude_seen, brand=brand,
                                      category=category)
        return answer

    async def describe(self, user_id: str) -> Optional[dict[str, Any]]:
        """What the user's profile holds (ProfileShard.describe), None for an unknown user."""
        return await self._read("describe", user_id)

    async def _connect(self, shard: int) -> None:
        """Find how to read `shard` without a Ray call: its read socket and board when it runs on
        this node (read_channel.py, profile_board.py); reads of other shards go through Ray."""
        address = await self.shards[shard].read_address.remote()
        local = address["node_id"] == ray.get_runtime_context().get_node_id()
        self.readers[shard] = ReadClient(address["path"], self.read_wait_s) if local else None
        self._drop_board(shard)
        if local and address["board"]:
            self.boards[shard] = BoardReader(address["board"])

    def _drop_board(self, shard: int) -> None:
        board = self.boards.pop(shard, None)
        if board is not None:
            board.close()

    async def _read(self, op: str, user_id: str, **options: Any) -> Any:
        """`op(user_id, **options)` on the user's shard: through its read socket when it runs on this node,
        else, or when the socket is gone, through Ray (which waits for a restarting shard; the
        socket is looked up again on the next read)."""
        shard = shard_of(user_id, self.num_shards)
        if shard not in self.readers:
            await self._connect(shard)
        reader = self.readers.get(shard)
        if reader is not None:
            try:
                return await reader.call(op, user_id=user_id, **options)
            except ChannelClosed as closed:
                log.info("read socket of shard %d closed (%s): reading through Ray", shard, closed)
                self.readers.pop(shard, None)  # concurrent reads may find it closed together
                self._drop_board(shard)
        return await getattr(self.shards[shard], op).remote(user_id=user_id, **options)

    def _recommend_from_board(self, user_id: str, k: int, exclude_seen: bool, brand: Optional[str],
                              category: Optional[str]) -> Optional[dict[str, Any]]:
        """The recommendations for a user whose state is on their shard's board, scored here; None
        when it is not there (or not usable: see profile_board.py) and the shard must answer."""
        shard = shard_of(user_id, self.num_shards)
        board = self.boards.get(shard)
        if board is None:
            return None
        fingerprint = board.fingerprint()
        if fingerprint != self.items_log.fingerprint:
            if self.board_misses.get(shard) == fingerprint:
                return None  # tried already: the shard applied the items files in another order
            self.catch_up()
            if fingerprint != self.items_log.fingerprint:
                log.info("shard %d applied other items files than this replica: its reads go to it", shard)
                self.board_misses[shard] = fingerprint
                return None
        packed = board.get(user_id)
        if packed is None or board.fingerprint() != fingerprint:
            return None
        if not board.writer_alive():  # restarted: its new incarnation writes a new board
            log.info("shard %d restarted: looking up its new board", shard)
            self.readers.pop(shard, None)
            self._drop_board(shard)
            return None
        state, _ = self.codec.unpack(user_id, packed, self.recommender.index.dim, counters=False)
        return recommendation(self.recommender, state, k, exclude_seen, brand, category)
