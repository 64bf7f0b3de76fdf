"""The EDA report says what a reader needs: ranked accounts have enough posts for a median, plots without
content are replaced by a sentence, figures have captions, numbers are rounded. No Ray."""

import datetime as dt
import json

from engagesim import io
from engagesim.report import CAPTIONS, eda
from engagesim.schema import POSTS


def _posts(tmp_path, media: bool) -> str:
    t0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
    rows = []
    for i in range(30):  # three steady accounts with 10 posts each
        rows.append({"post_id": f"s{i}", "author_id": f"a{i % 3}", "username": f"steady{i % 3}", "text": "x",
                     "media": [{"kind": "photo", "uri": "https://example.com/p.jpg"}] if media and i % 2 else [],
                     "created_at": t0 + dt.timedelta(hours=7 * i), "likes": 10 + i})
    for i in range(5):  # one-post accounts with one lucky post each
        rows.append({"post_id": f"l{i}", "author_id": f"b{i}", "username": f"lucky{i}", "text": "x", "media": [],
                     "created_at": t0 + dt.timedelta(hours=3 * i), "likes": 50_000 + i})
    uri = str(tmp_path / "posts")
    writer = io.DatasetWriter(uri, "posts")
    writer.write(_conformed(rows))
    writer.commit()
    return uri


def _conformed(rows):
    import pyarrow as pa

    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in POSTS} for r in rows], schema=POSTS)


def test_top_accounts_need_posts_and_an_empty_media_plot_becomes_a_sentence(tmp_path, monkeypatch):
    import engagesim.report as report

    ranked = {}
    barh = report.plt.Axes.barh

    def spy(self, names, values, *args, **kwargs):  # what each top-accounts panel ranks
        ranked[self.get_title() or len(ranked)] = list(names)
        return barh(self, names, values, *args, **kwargs)

    monkeypatch.setattr(report.plt.Axes, "barh", spy)
    summary = eda(_posts(tmp_path, media=False), str(tmp_path / "eda"), min_account_posts=3)
    by_likes = [names for names in ranked.values() if any(n.startswith("steady") for n in names)][-1]
    assert not any(n.startswith("lucky") for n in by_likes)  # 1-post accounts are not ranked by their median
    page = (tmp_path / "eda" / "index.html").read_text()
    assert "media_kinds.png" not in summary["plots"] and "No post has media attached" in page
    assert summary["media_items"] == {"none": 35}
    for plot in summary["plots"]:
        assert CAPTIONS[plot] in page  # a caption that says what the figure shows, not its file name
    assert summary["std_log1p_likes"] == round(summary["std_log1p_likes"], 3)
    assert json.loads((tmp_path / "eda" / "summary.json").read_text())["posts"] == 35


def test_media_plot_when_posts_have_media(tmp_path):
    summary = eda(_posts(tmp_path, media=True), str(tmp_path / "eda"))
    assert "media_kinds.png" in summary["plots"] and summary["media_items"]["photo"] == 15
