import pytest

from rewardflow.data.prompts import GroupedPromptSampler, PromptRecord, check_prompts, load_prompts
from rewardflow.shapes.grammar import parse_prompt


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na red circle\n\ntwo squares\n")
    assert [r.prompt for r in load_prompts(str(txt))] == ["a red circle", "two squares"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a circle", "category": "single_object"}\n')
    assert load_prompts(str(jl)) == [PromptRecord("a circle", {"category": "single_object"})]


def test_shipped_sets_load():
    assert len(load_prompts("shapes:eval")) == 180
    assert len(load_prompts("shapes:train")) > 100
    with pytest.raises(ValueError, match="shapes:train"):
        load_prompts("shapes:nope")


@pytest.mark.parametrize(
    "name,content,error,match",
    [
        ("missing.txt", None, FileNotFoundError, "does not exist"),
        ("empty.txt", "\n# only a comment\n", ValueError, "holds no prompts"),
        ("bad.jsonl", '{"prompt": "a circle"}\n{oops\n', ValueError, "bad.jsonl:2"),
        ("noprompt.jsonl", '{"text": "a circle"}\n', ValueError, "'prompt' string"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, error, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match):
        load_prompts(str(path))


def test_prompt_outside_grammar_names_its_position(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a circle\na purple elephant\n")
    with pytest.raises(ValueError, match=r"prompt 2: .*'elephant'"):
        check_prompts(load_prompts(str(path)), str(path), parse_prompt)


def test_grouped_sampler_is_deterministic_and_rank_aware():
    recs = [PromptRecord(f"p{i}") for i in range(10)]
    s = GroupedPromptSampler(recs, prompts_per_iter=3, group_size=4, seed=1)
    rows, groups = s.batch(5)
    assert len(rows) == 12 and groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert all(rows[i].prompt == rows[i - i % 4].prompt for i in range(12))
    assert [r.prompt for r in s.batch(5)[0]] == [r.prompt for r in rows]
    assert [r.prompt for r in s.batch(6)[0]] != [r.prompt for r in rows]
    r0 = GroupedPromptSampler(recs, 3, 4, seed=1, rank=0, world_size=2).batch(5)[0]
    r1 = GroupedPromptSampler(recs, 3, 4, seed=1, rank=1, world_size=2).batch(5)[0]
    assert [r.prompt for r in r0 + r1] == [r.prompt for r in rows]
    with pytest.raises(ValueError, match="world_size"):
        GroupedPromptSampler(recs, 3, 3, seed=1, world_size=2)


def test_grouped_sampler_balances_a_metadata_key():
    """9 prompts of category a and 1 of b: balanced by category, b is drawn about half the time."""
    recs = [PromptRecord(f"a{i}", {"category": "a"}) for i in range(9)] + [PromptRecord("b0", {"category": "b"})]
    plain = GroupedPromptSampler(recs, prompts_per_iter=1, group_size=1, seed=0)
    balanced = GroupedPromptSampler(recs, prompts_per_iter=1, group_size=1, seed=0, balance_by="category")
    share = {s: sum(x.batch(k)[0][0].prompt == "b0" for k in range(2000)) / 2000 for s, x in
             (("plain", plain), ("balanced", balanced))}  # fmt: skip
    assert abs(share["plain"] - 0.1) < 0.03 and abs(share["balanced"] - 0.5) < 0.04
    rows = balanced.batch(0)[0]
    assert rows == balanced.batch(0)[0]  # still a function of (seed, iteration)
    with pytest.raises(ValueError, match=r"balance_prompts_by='category'.*prompt 1 .*'category'"):
        GroupedPromptSampler([PromptRecord("x")], 1, 1, seed=0, balance_by="category")
