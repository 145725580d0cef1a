"""Block spans in a prompt (cp_engine.blend.spans), with the tiny model's real tokenizer."""
import pytest

from cp_engine.blend.spans import Segment, boundary_merges, encode_segments, locate_spans


@pytest.fixture(scope="module")
def encode():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from cp_engine.devtools.vllm_server import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    return lambda text: tok.encode(text, add_special_tokens=False)


DOC_A = "def parse(text):\n    return text.split()"
DOC_B = "class Reader:\n    pass"


def test_blocks_keep_their_ids_wherever_they_are_placed(encode):
    def prompt(*blocks, label="Doc"):
        segs = [Segment("<|im_start|>user\n")]
        for i, b in enumerate(blocks):
            segs += [Segment(f"[{label} {i}]\n"), Segment(b, block=True), Segment("\n\n")]
        return encode_segments(encode, segs + [Segment("Question: what?<|im_end|>\n")])

    first, second = prompt(DOC_A, DOC_B), prompt(DOC_B, DOC_A, label="Source")
    for rendered in (first, second):
        for (start, end), doc in zip(rendered.spans, (DOC_A, DOC_B) if rendered is first else (DOC_B, DOC_A)):
            assert rendered.ids[start:end] == encode(doc)
    # located from the ids alone, in either order
    assert locate_spans(second.ids, [encode(DOC_B), encode(DOC_A)]) == second.spans
    a_in_second = second.spans[1]
    assert a_in_second != first.spans[0]  # same block, another position


def test_merges_across_boundaries_are_detected(encode):
    glued = [Segment("abc"), Segment("def", block=True)]
    assert encode("abcdef") != encode("abc") + encode("def")  # the tokenizer really merges here
    assert boundary_merges(encode, glued) == [1]
    # a trailing space joins the next word when the text is tokenized whole
    spaced = [Segment("x = 1\n\n"), Segment("Doc: hello ", block=True), Segment("world")]
    assert boundary_merges(encode, spaced) == [2]
    clean = [Segment("<|im_start|>user\n"), Segment(DOC_A, block=True), Segment("<|im_end|>")]
    assert boundary_merges(encode, clean) == []


def test_a_merged_block_is_not_found_so_it_is_never_reused(encode):
    # tokenizing the joined text merged the block's first characters into its label
    ids = encode("abcdef and more")
    assert locate_spans(ids, [encode("def and more")]) == [None]


def test_locate_in_order_with_repeats_and_misses():
    prompt = [1, 2, 3, 9, 1, 2, 3, 7]
    assert locate_spans(prompt, [[1, 2, 3], [1, 2, 3], [5], [7]]) == [(0, 3), (4, 7), None, (7, 8)]
    assert locate_spans(prompt, [[2, 3, 9, 1], [3]]) == [(1, 5), (6, 7)]
    assert locate_spans(prompt, [[7, 8]]) == [None]  # runs off the end
    assert locate_spans([], [[1]]) == [None]
    with pytest.raises(ValueError, match="no tokens"):
        encode_segments(lambda s: [], [Segment("", block=True)])


def test_a_difference_only_the_whole_prompt_shows_flags_every_boundary():
    # a hand tokenizer whose merges reach over more than two segments
    def encode(text):
        return [len(text)] if len(text) > 5 else list(text.encode())

    assert boundary_merges(encode, [Segment("ab"), Segment("cd", block=True), Segment("ef")]) == [1, 2]
