import pytest

from sift.server.cache.block_pool import NULL_BLOCK, BlockPool


def test_fresh_pool_never_hands_out_the_null_block():
    pool = BlockPool(num_blocks=5, block_size=4)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    blocks = pool.allocate(4)
    assert sorted(blocks) == [1, 2, 3, 4] and NULL_BLOCK not in blocks
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    assert all(pool.ref_count(b) == 1 for b in blocks)


def test_allocate_is_all_or_nothing():
    pool = BlockPool(num_blocks=4, block_size=4)
    pool.allocate(2)
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) is not None


def test_release_returns_unhashed_blocks_to_the_free_list():
    pool = BlockPool(num_blocks=4, block_size=4)
    a, b = pool.allocate(2)
    pool.share([a])
    pool.release([a, b])
    assert pool.ref_count(a) == 1 and pool.ref_count(b) == 0
    assert pool.num_free_blocks == 2
    assert pool.usage == pytest.approx(1 / 3)


def test_cached_free_blocks_are_revived_by_share():
    pool = BlockPool(num_blocks=4, block_size=4)
    (a,) = pool.allocate(1)
    pool.cache(a, 1234)
    pool.release([a])
    assert pool.num_free_blocks == 3 and pool.lookup(1234) == a
    pool.share([a])
    assert pool.ref_count(a) == 1 and pool.num_free_blocks == 2


def test_allocation_prefers_truly_free_then_evicts_least_recently_freed():
    pool = BlockPool(num_blocks=5, block_size=4)
    a, b, c = pool.allocate(3)
    pool.cache(a, 10)
    pool.cache(b, 11)
    pool.release([b, a, c])  # b freed before a: b is evicted first
    (first,) = pool.allocate(1)
    assert first not in (a, b) and pool.lookup(10) == a and pool.lookup(11) == b
    pool.allocate(1)  # the other truly free block
    (evicted,) = pool.allocate(1)
    assert evicted == b and pool.lookup(11) is None and pool.lookup(10) == a
    assert pool.block_hash(b) is None and pool.num_evicted == 1


def test_a_hash_keeps_its_first_owner_and_uncache_forgets_it():
    pool = BlockPool(num_blocks=4, block_size=4)
    a, b = pool.allocate(2)
    pool.cache(a, 7)
    pool.cache(b, 7)
    assert pool.lookup(7) == a and pool.block_hash(b) is None
    pool.uncache(a)
    assert pool.lookup(7) is None
    pool.release([a])
    assert pool.num_free_blocks == 2  # an unhashed block goes back to the free list


def test_prefix_caching_disabled_registers_nothing():
    pool = BlockPool(num_blocks=3, block_size=4, enable_prefix_caching=False)
    (a,) = pool.allocate(1)
    pool.cache(a, 5)
    assert pool.lookup(5) is None
    pool.release([a])
    assert pool.num_free_blocks == 2


def test_null_block_is_ignored_by_share_and_release():
    pool = BlockPool(num_blocks=3, block_size=4)
    pool.share([NULL_BLOCK])
    pool.release([NULL_BLOCK])
    assert pool.ref_count(NULL_BLOCK) == 0 and pool.num_free_blocks == 2
