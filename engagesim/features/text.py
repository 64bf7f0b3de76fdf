"""Text features of a post (Adobe team 83 cleaning + LAYER6 regex statistics).

Vectorised with polars string expressions; no Ray. Placeholders the Adobe
organisers used (``<hyperlink>``, ``<mention>``) count as a link / mention.

A served request has one post: the polars select (~20 expressions) cost 4.5 ms of its ~25 ms on an idle
machine, nearly all of it per-expression overhead. Up to ``FEW_ROWS`` rows, the same regexes run through
Python's ``re`` when every character of the rows is one on which the two engines agree: Python's classes
(``\\w``, ``\\s``, ``\\d``, letters), ``str.isspace`` and ``str.lower`` give what polars' Rust regex and
``to_lowercase`` give, for the character and for what it lowercases to. Each character is checked once, by
asking polars (``_learn``); those that differ (``\\x1c``–``\\x1f`` are ``\\s`` to Python only; combining marks
and U+200D are ``\\w`` to Rust only, so most emoji with a variation selector) and the context-dependent final
sigma send their rows through polars. A property test over arbitrary Unicode holds the two paths equal.
"""

from __future__ import annotations

import re
import threading

import polars as pl

URL = r"https?://\S+|<hyperlink>"
MENTION = r"@\w+|<mention>"
HASHTAG = r"#(\w+)"
DOMAIN = r"https?://(?:www\.)?([^/\s]+)"
WORD = r"[^\W\d_][\w']*"

# Small multilingual stop list: the cleaning step of the Adobe pipeline.
STOP_WORDS = sorted(
    set(
        "a an the and or but of to in on at for with from by is are was were be been this that these those it its "
        "our your my we you they he she i me us them his her their as so if then than too very can will just "
        "el la los las y de en para con este es un una o le les et pour avec ce est der die das und zu von mit ist "
        "o os as e em com nosso é".split()
    )
)

TEXT_STAT_COLUMNS = [
    "n_chars", "n_words", "n_caps_words", "n_mentions", "n_hashtags", "n_urls", "mean_word_len",
    "n_questions", "n_exclaims",
]


def clean_expr(text: pl.Expr) -> pl.Expr:
    """Lower-cased text without URLs, mentions, hashtag signs, punctuation and stop words."""
    stop = "|".join(STOP_WORDS)
    return (
        text.str.replace_all(URL, " ")
        .str.replace_all(MENTION, " ")
        .str.replace_all("#", " ")
        .str.to_lowercase()
        .str.replace_all(r"[^\w\s]", " ")
        .str.replace_all(rf"\b(?:{stop})\b", " ")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )


def text_features(posts: pl.DataFrame) -> pl.DataFrame:
    """Counts, lists and the cleaned text (+ inferred company, as Adobe's team appended it)."""
    return _text_rows(posts) if _is_few_agreed(posts) else _text_polars(posts)


def _text_polars(posts: pl.DataFrame) -> pl.DataFrame:
    text = pl.col("text").fill_null("")
    # The words feed three columns: extracted once as a column (as three expressions they were extracted three
    # times — 1,000 posts on one thread: 23.8 → 16.7 ms for the whole select).
    words = pl.col("_words")
    company = pl.col("company") if "company" in posts.columns else pl.lit(None, dtype=pl.String)
    cleaned = clean_expr(text)
    extracted = text.str.replace_all(URL, " ").str.replace_all(MENTION, " ").str.extract_all(WORD)
    return posts.with_columns(extracted.alias("_words")).select(
        pl.col("post_id"),
        text.str.len_chars().alias("n_chars"),
        words.list.len().alias("n_words"),
        words.list.eval(pl.element().str.contains(r"^[A-Z][A-Z']+$").cast(pl.Int32)).list.sum().alias("n_caps_words"),
        text.str.count_matches(MENTION).alias("n_mentions"),
        text.str.count_matches(HASHTAG).alias("n_hashtags"),
        text.str.count_matches(URL).alias("n_urls"),
        words.list.eval(pl.element().str.len_chars()).list.mean().fill_null(0.0).alias("mean_word_len"),
        text.str.count_matches(r"\?").alias("n_questions"),
        text.str.count_matches("!").alias("n_exclaims"),
        text.str.extract_all(HASHTAG).list.eval(pl.element().str.slice(1).str.to_lowercase()).alias("hashtags"),
        text.str.extract_all(r"@\w+").list.eval(pl.element().str.slice(1).str.to_lowercase()).alias("mentions"),
        text.str.extract_all(DOMAIN).list.eval(
            pl.element().str.replace(r"^https?://(?:www\.)?", "").str.replace(r"/.*$", "").str.to_lowercase()
        ).alias("domains"),
        pl.when(company.is_not_null() & (company != ""))
        .then(pl.concat_str([cleaned, company.str.to_lowercase()], separator=" "))
        .otherwise(cleaned)
        .str.strip_chars()
        .alias("clean_text"),
    ).with_columns(pl.col(c).cast(pl.Float32) for c in TEXT_STAT_COLUMNS)


FEW_ROWS = 64
_RE = {name: re.compile(pattern) for name, pattern in {
    "url": URL, "mention": MENTION, "hashtag": r"#\w+", "at": r"@\w+", "domain": DOMAIN, "word": WORD,
    "caps": r"[A-Z][A-Z']+", "scheme": r"^https?://(?:www\.)?", "path": r"/.*$", "punct": r"[^\w\s]",
    "stop": rf"\b(?:{'|'.join(STOP_WORDS)})\b", "spaces": r"\s+"}.items()}
_CLASSES = {"w": r"\w", "s": r"\s", "d": r"\d", "letter": r"[^\W\d_]", "punct": r"[^\w\s]"}
_AGREE: dict[str, bool] = {}  # character → both engines treat it alike (filled by _learn, never shrinks)
_AGREE_LOCK = threading.Lock()


def _learn(chars: set[str]) -> None:
    """Record, for characters not seen before, whether Python's re / str methods and polars agree on them."""
    todo = sorted(chars - _AGREE.keys())
    if not todo:
        return
    lowered = {c: c.lower() for c in todo}
    probe = sorted(set(todo).union(*map(set, lowered.values())))
    rust = pl.DataFrame({"c": probe}, schema={"c": pl.String}).select(
        *[pl.col("c").str.contains(f"^{pattern}$").alias(k) for k, pattern in _CLASSES.items()],
        pl.col("c").str.to_lowercase().alias("lower"))
    classes = {k: rust[k].to_list() for k in _CLASSES}
    same = {c: all(bool(re.fullmatch(pattern, c)) == classes[k][i] for k, pattern in _CLASSES.items())
            and c.isspace() == classes["s"][i] for i, c in enumerate(probe)}
    rust_lower = dict(zip(probe, rust["lower"].to_list()))
    with _AGREE_LOCK:
        for c in todo:  # Σ: its lowercase depends on the letters around it (final sigma)
            _AGREE[c] = (c != "\u03a3" and same[c] and rust_lower[c] == lowered[c]
                         and all(same[x] for x in lowered[c]))


def _is_few_agreed(posts: pl.DataFrame) -> bool:
    if posts.height > FEW_ROWS:
        return False
    return agreed(posts["text"].to_list(), posts["company"].to_list() if "company" in posts.columns else [])


def agreed(texts: list[str | None], companies: list[str | None]) -> bool:
    """Whether Python's re / str methods and polars treat every character of these texts alike (``text_rows``
    then equals the polars path)."""
    chars = set().union(*(set(v) for v in (*texts, *companies) if v))
    _learn(chars)
    return all(_AGREE[c] for c in chars)


def _clean(text: str) -> str:
    r = _RE
    out = r["mention"].sub(" ", r["url"].sub(" ", text)).replace("#", " ").lower()
    out = r["spaces"].sub(" ", r["stop"].sub(" ", r["punct"].sub(" ", out)))
    return out.strip()


def _row(text: str | None, company: str | None) -> dict:
    r = _RE
    text = text or ""
    words = r["word"].findall(r["mention"].sub(" ", r["url"].sub(" ", text)))
    cleaned = _clean(text)
    if company:
        cleaned = f"{cleaned} {company.lower()}"
    return {"n_chars": len(text), "n_words": len(words), "n_caps_words": sum(bool(r["caps"].fullmatch(w)) for w in words),
            "n_mentions": len(r["mention"].findall(text)), "n_hashtags": len(r["hashtag"].findall(text)),
            "n_urls": len(r["url"].findall(text)),
            "mean_word_len": sum(len(w) for w in words) / len(words) if words else 0.0,
            "n_questions": text.count("?"), "n_exclaims": text.count("!"),
            "hashtags": [m[1:].lower() for m in r["hashtag"].findall(text)],
            "mentions": [m[1:].lower() for m in r["at"].findall(text)],
            "domains": [r["path"].sub("", r["scheme"].sub("", m.group(0)), count=1).lower()
                        for m in r["domain"].finditer(text)],
            "clean_text": cleaned.strip()}


TEXT_SCHEMA = {**{c: pl.Float32 for c in TEXT_STAT_COLUMNS}, "hashtags": pl.List(pl.String),
           "mentions": pl.List(pl.String), "domains": pl.List(pl.String), "clean_text": pl.String}


def _text_rows(posts: pl.DataFrame) -> pl.DataFrame:
    """``text_features`` of a few rows the engines agree on, row by row in Python (equal to the polars path)."""
    companies = posts["company"].to_list() if "company" in posts.columns else [None] * posts.height
    columns = text_rows(posts["text"].to_list(), companies)
    return pl.concat([posts.select("post_id"), pl.DataFrame(columns, schema=TEXT_SCHEMA)], how="horizontal")


def text_rows(texts: list[str | None], companies: list[str | None]) -> dict[str, list]:
    """The text columns (``TEXT_SCHEMA``'s) of a few rows, as Python lists: call only where ``agreed``."""
    rows = [_row(t, c) for t, c in zip(texts, companies)]
    return {name: [row[name] for row in rows] for name in TEXT_SCHEMA}
