import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sift.server.cache.block_pool import NULL_BLOCK
from sift.server.cache.kv_manager import KVManager

BS = 4


class FakeKV:
    """A physical pool [Hkv, num_slots] that applies what the manager tells the runner to do."""

    def __init__(self, num_blocks: int, heads: int = 2) -> None:
        self.data = np.full((heads, num_blocks * BS), -1, dtype=np.int64)

    def copy(self, copies) -> None:
        for src, dst in copies:
            self.data[:, dst * BS:(dst + 1) * BS] = self.data[:, src * BS:(src + 1) * BS]

    def write(self, slots, values) -> None:  # values: [Hkv, len(slots)]
        self.data[:, slots] = values

    def apply(self, plan) -> None:
        self.copy(plan.copies)
        gathered = np.stack([self.data[h, plan.src_slots[0, h]] for h in range(self.data.shape[0])])
        self.data[:, plan.dst_slots] = gathered

    def read(self, mgr: KVManager, req) -> np.ndarray:
        return self.data[:, mgr.slots(req, 0, mgr.num_resident(req))]


def test_allocate_slots_follows_the_block_table_and_is_all_or_nothing():
    mgr = KVManager(num_blocks=4, block_size=BS)
    slots = mgr.allocate_slots("a", 6)
    table = mgr.block_table("a")
    assert len(table) == 2 and mgr.num_resident("a") == 6
    assert slots == [table[i // BS] * BS + i % BS for i in range(6)]
    assert mgr.allocate_slots("a", 2) == [table[1] * BS + 2, table[1] * BS + 3]  # fills the tail, no new block
    assert mgr.num_free_blocks == 1
    assert mgr.allocate_slots("a", 5) is None  # needs 2 blocks, 1 free
    assert mgr.num_resident("a") == 8 and mgr.block_table("a") == table and mgr.num_free_blocks == 1
    assert mgr.allocate_slots("b", 5) is None and not mgr.has("b")
    assert mgr.blocks_needed("a", 5) == 2 and mgr.num_free_blocks == 1  # 2 needed, 1 free: no room
    mgr.free("a")
    assert mgr.num_free_blocks == 3 and mgr.num_requests == 0


def _prefill(mgr, req, tokens):
    blocks, hit = mgr.get_computed_blocks(tokens)
    slots = mgr.allocate_slots(req, len(tokens) - hit, blocks, hit)
    if slots is not None:
        mgr.cache_blocks(req, tokens, len(tokens))
    return blocks, hit, slots


def test_shared_prefix_hits_and_is_never_the_whole_prompt():
    mgr = KVManager(num_blocks=10, block_size=BS)
    prompt = list(range(8))  # exactly two full blocks
    _, hit, _ = _prefill(mgr, "a", prompt)
    assert hit == 0
    blocks, hit = mgr.get_computed_blocks(prompt)
    assert hit == 4 and blocks == mgr.block_table("a")[:1]  # the last token must still be computed
    blocks, hit, _ = _prefill(mgr, "b", prompt + [99, 100])
    assert hit == 8 and mgr.block_table("b")[:2] == mgr.block_table("a")
    assert [mgr.pool.ref_count(b) for b in blocks] == [2, 2]
    assert mgr.get_computed_blocks([5] + prompt)[1] == 0  # same tokens, different prefix
    assert mgr.stats["prefix_cache_queries"] == 8 + 8 + 10 + 9 and mgr.stats["prefix_cache_hits"] == 4 + 8


def test_freed_cached_blocks_are_reused_then_evicted_tail_first():
    mgr = KVManager(num_blocks=6, block_size=BS)
    prompt = list(range(13))
    _prefill(mgr, "a", prompt)
    table = mgr.block_table("a")
    mgr.free("a")
    assert mgr.num_free_blocks == 5 and mgr.usage == 0.0
    blocks, hit = mgr.get_computed_blocks(prompt)
    assert hit == 12 and blocks == table[:3]
    # Another request needs 2 blocks: the never-used block, then the prefix's *last* block (unhashed
    # partial tail, so truly free) -- the hashed full blocks survive.
    mgr.allocate_slots("x", 8)
    assert table[3] in mgr.block_table("x") and not set(table[:3]) & set(mgr.block_table("x"))
    assert mgr.get_computed_blocks(prompt) == (table[:3], 12) and mgr.stats["evicted_cached_blocks"] == 0
    mgr.allocate_slots("y", 4)  # now a cached block must go: the tail-most one
    assert mgr.block_table("y") == [table[2]] and mgr.stats["evicted_cached_blocks"] == 1
    assert mgr.get_computed_blocks(prompt) == (table[:2], 8)
    mgr.free("x")
    blocks, hit, slots = _prefill(mgr, "b", prompt)
    assert slots is not None and mgr.block_table("b")[:2] == table[:2] and mgr.num_free_blocks == 0


def test_adopting_hits_counts_revived_blocks_against_the_pool():
    mgr = KVManager(num_blocks=4, block_size=BS)
    _prefill(mgr, "a", list(range(9)))
    mgr.free("a")
    blocks, hit = mgr.get_computed_blocks(list(range(8)) + [50] * 9)
    assert hit == 8
    assert mgr.allocate_slots("b", 9, blocks, hit) is None  # 2 revived + 3 new > 3 free
    assert [mgr.pool.ref_count(b) for b in blocks] == [0, 0] and mgr.num_free_blocks == 3
    with pytest.raises(ValueError):
        mgr.allocate_slots("b", 1, blocks, 7)


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    mgr = KVManager(num_blocks=5, block_size=BS)
    kv = FakeKV(5)
    kv.write(mgr.allocate_slots("p", 6), np.arange(12).reshape(2, 6))
    copies = mgr.fork("p", "c")
    pt, ct = mgr.block_table("p"), mgr.block_table("c")
    assert ct[0] == pt[0] and ct[1] != pt[1] and copies == [(pt[1], ct[1])]
    assert mgr.pool.ref_count(pt[0]) == 2 and mgr.num_resident("c") == 6
    kv.copy(copies)
    kv.write(mgr.allocate_slots("c", 1), [[100], [101]])
    kv.write(mgr.allocate_slots("p", 1), [[200], [201]])
    assert kv.read(mgr, "p")[0].tolist() == [0, 1, 2, 3, 4, 5, 200]
    assert kv.read(mgr, "c")[0].tolist() == [0, 1, 2, 3, 4, 5, 100]
    mgr.allocate_slots("x", 4)
    assert mgr.num_free_blocks == 0 and mgr.fork("p", "d") is None and not mgr.has("d")
    assert mgr.pool.ref_count(pt[0]) == 2
    mgr.truncate("p", 4)
    assert mgr.fork("p", "d") == [] and mgr.pool.ref_count(pt[0]) == 3  # block-aligned: nothing to copy


def test_compact_moves_each_heads_kept_entries_and_frees_the_tail():
    mgr = KVManager(num_blocks=6, block_size=BS)
    kv = FakeKV(6)
    values = np.arange(2 * 11).reshape(2, 11)
    kv.write(mgr.allocate_slots("a", 11), values)
    free_before = mgr.num_free_blocks
    keep = np.array([[[0, 1, 5, 9, 10], [2, 3, 4, 7, 8]]])  # [L=1, Hkv=2, N=5]
    plan = mgr.compact("a", keep)
    assert plan.copies == [] and plan.src_slots.shape == (1, 2, 5) and plan.src_slots.dtype == np.int64
    assert plan.dst_slots.tolist() == mgr.slots("a", 0, 5)
    kv.apply(plan)
    assert mgr.num_resident("a") == 5 and len(mgr.block_table("a")) == 2
    assert mgr.num_free_blocks == free_before + 1
    assert kv.read(mgr, "a").tolist() == [values[0, keep[0, 0]].tolist(), values[1, keep[0, 1]].tolist()]
    assert mgr.stats["compactions"] == 1 and mgr.stats["compaction_freed_blocks"] == 1
    kv.write(mgr.allocate_slots("a", 1), [[77], [78]])  # appends after the kept entries
    assert kv.read(mgr, "a")[:, -1].tolist() == [77, 78]


def test_compact_copies_shared_blocks_first_and_rewritten_blocks_never_hit_again():
    mgr = KVManager(num_blocks=12, block_size=BS)
    kv = FakeKV(12)
    prompt = list(range(13))
    _prefill(mgr, "a", prompt)
    kv.write(mgr.slots("a", 0, 13), np.arange(26).reshape(2, 13))
    blocks, hit, slots = _prefill(mgr, "b", prompt + [1, 2, 3])
    assert hit == 12
    kv.write(slots, [[40, 41, 42, 43], [50, 51, 52, 53]])
    a_before = kv.read(mgr, "a").copy()
    b_before = kv.read(mgr, "b").copy()
    shared = mgr.block_table("b")
    # Keep block 0 as is, drop entry 5 (rewrites blocks 1 and 2), keep the rest.
    keep_row = [i for i in range(16) if i != 5]
    plan = mgr.compact("b", np.array([[keep_row, keep_row]]))
    table = mgr.block_table("b")
    assert table[0] == shared[0] and table[1] != shared[1] and table[2] != shared[2]
    assert plan.copies == [(shared[1], table[1]), (shared[2], table[2])]
    assert mgr.pool.ref_count(shared[1]) == 1 and mgr.pool.ref_count(shared[0]) == 2
    kv.apply(plan)
    assert kv.read(mgr, "a").tolist() == a_before.tolist()  # the other owner is untouched
    assert kv.read(mgr, "b").tolist() == b_before[:, keep_row].tolist()
    # a's blocks are still hits; b's rewritten blocks and anything b computes later are not.
    assert mgr.get_computed_blocks(prompt + [0])[0] == mgr.block_table("a")[:3]
    mgr.free("a")
    mgr.cache_blocks("b", prompt + [1, 2, 3], 16)
    hits, _ = mgr.get_computed_blocks(prompt + [1, 2, 3, 4, 5])
    assert not set(hits) & set(table[1:])
    assert all(mgr.pool.block_hash(b) is None for b in table[1:])


def test_compact_fails_cleanly_when_unsharing_needs_blocks():
    mgr = KVManager(num_blocks=4, block_size=BS)
    mgr.allocate_slots("a", 8)
    mgr.fork("a", "b")
    mgr.allocate_slots("x", 4)
    table = mgr.block_table("b")
    assert mgr.compact("b", np.array([[[1, 2, 3]]])) is None
    assert mgr.block_table("b") == table and mgr.num_resident("b") == 8 and mgr.num_free_blocks == 0
    plan = mgr.compact("b", np.array([[[0, 1, 2, 3]]]))  # identity on block 0: nothing to unshare
    assert plan.copies == [] and mgr.block_table("b") == table[:1] and mgr.pool.ref_count(table[1]) == 1


def test_compact_rejects_bad_keep():
    mgr = KVManager(num_blocks=4, block_size=BS)
    mgr.allocate_slots("a", 6)
    for keep in ([[[1, 1]]], [[[2, 6]]], [[[-1, 2]]], [[1, 2]]):
        with pytest.raises(ValueError):
            mgr.compact("a", np.array(keep))
    assert mgr.num_resident("a") == 6


def test_truncate_frees_tail_blocks_and_unhashes_the_new_tail():
    mgr = KVManager(num_blocks=6, block_size=BS)
    tokens = list(range(12))
    _prefill(mgr, "a", tokens)
    table = mgr.block_table("a")
    assert mgr.truncate("a", 6) == []
    assert mgr.block_table("a") == table[:2] and mgr.num_resident("a") == 6
    assert mgr.pool.ref_count(table[2]) == 0
    assert mgr.pool.block_hash(table[1]) is None and mgr.pool.block_hash(table[0]) is not None
    assert mgr.allocate_slots("a", 3) == [table[1] * BS + i for i in (2, 3)] + [mgr.block_table("a")[2] * BS]
    with pytest.raises(ValueError):
        mgr.truncate("a", 10)


def test_truncate_into_a_shared_block_copies_it():
    mgr = KVManager(num_blocks=6, block_size=BS)
    kv = FakeKV(6)
    kv.write(mgr.allocate_slots("p", 8), np.arange(16).reshape(2, 8))
    mgr.fork("p", "c")
    shared = mgr.block_table("c")[1]
    copies = mgr.truncate("c", 6)
    assert copies == [(shared, mgr.block_table("c")[1])] and mgr.pool.ref_count(shared) == 1
    kv.copy(copies)
    kv.write(mgr.allocate_slots("c", 1), [[-5], [-6]])
    assert kv.read(mgr, "p")[0].tolist() == list(range(8))
    assert kv.read(mgr, "c")[0].tolist() == [0, 1, 2, 3, 4, 5, -5]
    assert mgr.fork("p", "d") == []
    mgr.allocate_slots("x", 4 * mgr.num_free_blocks)
    assert mgr.truncate("d", 6) is None  # the copy would need a block and the cut frees none
    assert mgr.num_resident("d") == 8 and mgr.pool.ref_count(mgr.block_table("d")[1]) == 2


def test_release_outside_window_leaves_holes_and_keeps_working():
    mgr = KVManager(num_blocks=10, block_size=BS)
    mgr.allocate_slots("a", 22)  # blocks 0..5, the last one partial
    table = mgr.block_table("a")
    # keep [0, 2) (block 0) and [14, 22) (blocks 3..5): blocks 1 and 2 go
    assert mgr.release_outside_window("a", sinks=2, window=8) == 2
    assert mgr.block_table("a") == [table[0], NULL_BLOCK, NULL_BLOCK] + table[3:]
    assert mgr.num_free_blocks == 9 - 6 + 2
    assert mgr.release_outside_window("a", sinks=2, window=8) == 0
    mgr.allocate_slots("a", 4)  # 26 resident: block 3 ([12, 16)) is now out of the window
    assert mgr.release_outside_window("a", sinks=2, window=8) == 1
    assert mgr.block_table("a")[3] == NULL_BLOCK and mgr.stats["window_freed_blocks"] == 3
    assert mgr.release_outside_window("a", sinks=0, window=0) == 2  # never the partial tail block
    assert mgr.block_table("a")[-1] != NULL_BLOCK
    mgr.free("a")
    assert mgr.num_free_blocks == 9


class KVMachine(RuleBasedStateMachine):
    """Random interleavings, checked against a fake physical pool: every request always reads back
    exactly what it wrote or kept, reference counts match the block tables, and all comes back."""

    NUM_BLOCKS = 14

    def __init__(self):
        super().__init__()
        self.mgr = KVManager(self.NUM_BLOCKS, BS)
        self.kv = FakeKV(self.NUM_BLOCKS)
        self.expected: dict[int, np.ndarray] = {}  # [Hkv, num_resident]; -2 = released by the window
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0
        self.prefix_ids: dict[tuple, int] = {}

    def _values(self, tokens, start, n):
        """What a token's KV looks like: a function of its prefix, so prefix hits can be checked."""
        ids = [self.prefix_ids.setdefault(tuple(tokens[:p + 1]), len(self.prefix_ids)) for p in range(start, start + n)]
        return np.array([[10 * i + h for i in ids] for h in range(2)], dtype=np.int64).reshape(2, n)

    @rule(prompt=st.lists(st.integers(0, 1), min_size=1, max_size=14))
    def add(self, prompt):
        rid, self.next_id = self.next_id, self.next_id + 1
        blocks, hit = self.mgr.get_computed_blocks(prompt)
        slots = self.mgr.allocate_slots(rid, len(prompt) - hit, blocks, hit)
        if slots is None:
            assert not self.mgr.has(rid)
            return
        assert self.kv.read(self.mgr, rid)[:, :hit].tolist() == self._values(prompt, 0, hit).tolist()
        self.kv.write(slots, self._values(prompt, hit, len(prompt) - hit))
        self.mgr.cache_blocks(rid, prompt, len(prompt))
        self.expected[rid], self.tokens[rid] = self._values(prompt, 0, len(prompt)), list(prompt)

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), new=st.lists(st.integers(0, 1), min_size=1, max_size=6))
    def append(self, data, new):
        rid = data.draw(st.sampled_from(sorted(self.expected)))
        slots = self.mgr.allocate_slots(rid, len(new))
        if slots is None:
            return
        tokens = self.tokens[rid] + new
        values = self._values(tokens, len(tokens) - len(new), len(new))
        self.kv.write(slots, values)
        self.mgr.cache_blocks(rid, tokens, len(tokens))
        self.expected[rid], self.tokens[rid] = np.concatenate([self.expected[rid], values], axis=1), tokens

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def fork(self, data):
        rid = data.draw(st.sampled_from(sorted(self.expected)))
        child, self.next_id = self.next_id, self.next_id + 1
        copies = self.mgr.fork(rid, child)
        if copies is not None:
            self.kv.copy(copies)
            self.expected[child], self.tokens[child] = self.expected[rid].copy(), list(self.tokens[rid])

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def truncate(self, data):
        rid = data.draw(st.sampled_from(sorted(self.expected)))
        n = data.draw(st.integers(0, self.mgr.num_resident(rid)))
        copies = self.mgr.truncate(rid, n)
        if copies is None:
            return
        self.kv.copy(copies)
        self.expected[rid], self.tokens[rid] = self.expected[rid][:, :n], self.tokens[rid][:n]

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def compact(self, data):
        rid = data.draw(st.sampled_from(sorted(self.expected)))
        live = np.flatnonzero(self.expected[rid][0] != -2)
        n = data.draw(st.integers(0, len(live)))
        keep = np.stack([np.sort(data.draw(st.permutations(live.tolist())).__getitem__(slice(n)))
                         for _ in range(2)]).reshape(1, 2, n).astype(np.int64)
        plan = self.mgr.compact(rid, keep)
        if plan is None:
            return
        self.kv.apply(plan)
        self.expected[rid] = np.stack([self.expected[rid][h, keep[0, h]] for h in range(2)]).reshape(2, n)
        # Rewritten KV is not a function of the tokens any more: fresh tokens keep prefix checks honest.
        self.tokens[rid] = [1000 + self.next_id] * n
        self.next_id += 1

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), sinks=st.integers(0, 5), window=st.integers(0, 9))
    def window(self, data, sinks, window):
        rid = data.draw(st.sampled_from(sorted(self.expected)))
        self.mgr.release_outside_window(rid, sinks, window)
        holes = np.repeat(np.array(self.mgr.block_table(rid)) == NULL_BLOCK, BS)[:self.mgr.num_resident(rid)]
        self.expected[rid][:, holes] = -2

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.expected)))
        self.mgr.free(rid)
        del self.expected[rid], self.tokens[rid]

    @invariant()
    def contents_and_refs_are_consistent(self):
        refs = np.zeros(self.NUM_BLOCKS, dtype=int)
        for rid, exp in self.expected.items():
            table = self.mgr.block_table(rid)
            assert len(table) == -(-self.mgr.num_resident(rid) // BS)
            refs[[b for b in table if b != NULL_BLOCK]] += 1
            got = self.kv.read(self.mgr, rid)
            live = exp[0] != -2
            assert got[:, live].tolist() == exp[:, live].tolist()
        assert [self.mgr.pool.ref_count(b) for b in range(self.NUM_BLOCKS)] == refs.tolist()
        assert self.mgr.num_free_blocks == self.NUM_BLOCKS - 1 - int((refs > 0).sum())

    def teardown(self):
        for rid in list(self.expected):
            self.mgr.free(rid)
        assert self.mgr.num_free_blocks == self.NUM_BLOCKS - 1 and self.mgr.num_requests == 0
        assert all(self.mgr.pool.ref_count(b) == 0 for b in range(self.NUM_BLOCKS))


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
