"""Text features of a post (Adobe team 83 cleaning + LAYER6 regex statistics).

Vectorised with polars string expressions; no Ray. Placeholders the Adobe
organisers used (``<hyperlink>``, ``<mention>``) count as a link / mention.
"""

from __future__ import annotations

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
    text = pl.col("text").fill_null("")
    words = text.str.replace_all(URL, " ").str.replace_all(MENTION, " ").str.extract_all(WORD)
    company = pl.col("company") if "company" in posts.columns else pl.lit(None, dtype=pl.String)
    cleaned = clean_expr(text)
    return posts.select(
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
