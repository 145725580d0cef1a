"""BlockTrie's bulk build and its seeded search answer as the plain operations do."""

from hypothesis import given, settings, strategies as st

from cp_engine.trie import BlockTrie

orders_st = st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=6, unique=True), min_size=1, max_size=15)


def weight(b):
    return 1.0 + (b % 3)


@settings(max_examples=80, deadline=None)
@given(orders_st)
def test_insert_all_builds_what_inserting_one_by_one_builds(orders):
    one = BlockTrie()
    paths = [one.insert(o, [weight(b) for b in o]) for o in orders]
    bulk = BlockTrie()
    assert bulk.insert_all(orders, weight) == paths
    assert vars(bulk) == vars(one)
    listed = BlockTrie()  # weights as a list indexed by block
    assert listed.insert_all(orders, [weight(b) for b in range(7)]) == paths
    assert vars(listed) == vars(one)


@settings(max_examples=80, deadline=None)
@given(orders_st, st.data())
def test_deepest_contained_seeded_with_a_known_node_gives_the_same_answer(orders, data):
    trie = BlockTrie()
    paths = [trie.insert(o, [weight(b) for b in o]) for o in orders]
    r = data.draw(st.integers(0, len(orders) - 1))
    members = set(data.draw(st.lists(st.integers(0, 6), max_size=7))) | set(orders[r])
    path = paths[r]
    # Any node of r's path others hold too qualifies as a known answer.
    shared = [n for n in path if trie.refs[n] >= 2]
    known = data.draw(st.sampled_from(shared)) if shared else 0
    plain = trie.deepest_contained(members, without=path)
    assert trie.deepest_contained(members, without=path, known=known) == plain


def deepest_by_definition(trie, members, without):
    """Every live node whose path uses only ``members``, best by (path weight,
    references not counting ``without``, lower number); nodes only ``without``
    holds are out."""
    own = set(without)
    best, best_key = 0, (0.0, 0, 0)
    for n in range(1, len(trie.parent)):
        if not trie.is_live(n) or (n in own and trie.refs[n] <= 1):
            continue
        if not all(trie.block[p] in members for p in trie.path_to(n)):
            continue
        key = (trie.depth_weight[n], trie.refs[n] - (n in own), -n)
        if key > best_key:
            best, best_key = n, key
    return best


@settings(max_examples=150, deadline=None)
@given(orders_st, st.data())
def test_deepest_contained_is_the_best_node_by_definition(orders, data):
    trie = BlockTrie()
    paths = [trie.insert(o, [weight(b) for b in o]) for o in orders]
    for o, p in zip(orders, paths):  # releases leave height bounds above the truth
        if data.draw(st.booleans()):
            trie.release(p)
    r = data.draw(st.integers(0, len(orders) - 1))
    members = set(data.draw(st.lists(st.integers(0, 6), max_size=7))) | set(orders[r])
    path = trie.insert(orders[r], [weight(b) for b in orders[r]])
    want = deepest_by_definition(trie, members, path)
    assert trie.deepest_contained(members, budget=10**9, without=path) == want
