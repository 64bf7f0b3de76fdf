import pytest

from engagesim.loaders.coerce import MediaParseError, parse_media

PHOTO = "Photo(previewUrl='https://p/x?name=small', fullUrl='https://p/x?name=large')"
VIDEO = (
    "Video(thumbnailUrl='https://t/v.jpg', variants=[VideoVariant(contentType='video/mp4', "
    "url='https://v/1.mp4', bitrate=832000), VideoVariant(contentType='application/x-mpegURL', url='https://v/p.m3u8', bitrate=None)], duration=12.5, views=None)"
)
GIF = "Gif(thumbnailUrl='https://t/g.jpg', variants=[VideoVariant(contentType='video/mp4', url='https://v/g.mp4', bitrate=0)])"


def test_adobe_repr_with_all_kinds():
    items = parse_media(f"[{PHOTO}, {VIDEO}, {GIF}]")
    assert items == [
        {"kind": "photo", "uri": "https://p/x?name=large"},
        {"kind": "video", "uri": "https://t/v.jpg"},
        {"kind": "gif", "uri": "https://t/g.jpg"},
    ]


@pytest.mark.parametrize("empty", [None, "", "[]", float("nan")])
def test_no_media(empty):
    assert parse_media(empty) == []


def test_json_form():
    assert parse_media('[{"kind": "Photo", "uri": "s3://b/k.png"}]') == [{"kind": "photo", "uri": "s3://b/k.png"}]


@pytest.mark.parametrize(
    "bad, match",
    [
        (f"[{PHOTO[:-10]}", "malformed media string"),
        ("[Sticker(url='x')]", "unknown media kind"),
        ("Photo(fullUrl='x')", "expected a"),
        ("[Photo(previewUrl=None)]", "has no URL"),
        ("[__import__('os').system('true')]", "unknown media kind|malformed"),
    ],
)
def test_malformed_media_is_an_error_not_a_crash(bad, match):
    with pytest.raises(MediaParseError, match=match):
        parse_media(bad)
