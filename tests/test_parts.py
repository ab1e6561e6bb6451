"""Content parts (OpenAI / HF style) and media references -> plain messages and media items; in-memory media."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from ixc_engine.formats.parts import (
    MediaResolver,
    PartsError,
    decode_data_uri,
    flatten_messages,
    resolve_media_ref,
)
from ixc_engine.media.loader import MediaBytes, load_media, media_digest


def _png_bytes(size=(40, 30), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_text_and_image_parts_become_placeholders_in_order(tmp_path):
    res = MediaResolver(base_dir=tmp_path)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.jpg"}},
                                         {"type": "text", "text": "What is "}, {"type": "text", "text": "this?"},
                                         {"type": "video", "video": "file:///data/v.mp4"}]},
            {"role": "assistant", "content": "A cat."}]
    out, media = flatten_messages(msgs, res)
    assert out == [{"role": "user", "content": "<ImageHere>What is this?<ImageHere>"},
                   {"role": "assistant", "content": "A cat."}]
    assert media == [str(tmp_path / "a.jpg"), "/data/v.mp4"]


def test_plain_messages_pass_through_with_their_media():
    msgs = [{"role": "user", "content": "<ImageHere>hi"}, {"role": "assistant", "content": "yo"}]
    out, media = flatten_messages(msgs, MediaResolver(), external=["x.png"])
    assert out == msgs and media == ["x.png"]


def test_payloadless_parts_take_the_records_media_in_order():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "two"}]}]
    out, media = flatten_messages(msgs, MediaResolver(), external=["1.png", "2.png"])
    assert out[0]["content"] == "<ImageHere>and<ImageHere>" and out[1]["content"] == "two"
    assert media == ["1.png", "2.png"]
    with pytest.raises(PartsError, match="only 1 items"):
        flatten_messages(msgs, MediaResolver(), external=["1.png"])
    with pytest.raises(PartsError, match="lists 3 media items but its content parts use 2"):
        flatten_messages(msgs, MediaResolver(), external=["1.png", "2.png", "3.png"])


@pytest.mark.parametrize("part, match", [
    ({"type": "audio", "audio": "x"}, "unknown type 'audio'"),
    ({"type": "text"}, "without a string 'text'"),
    ({"type": "text", "text": "<ImageHere>"}, "literal <ImageHere>"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "never fetched"),
    ({"type": "image_url", "image_url": {"url": 5}}, "must be a string"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "not valid base64"),
    ({"type": "image_url", "image_url": {"url": "data:video/mp4;base64,AAAA"}}, "of type video/mp4"),
    ({"type": "image_url", "image_url": {"url": "gopher://x"}}, "unsupported URL scheme"),
    (7, "must be an object"),
])
def test_bad_parts_name_message_and_part(part, match):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "q"}, part]}]
    with pytest.raises(PartsError, match=match) as info:
        flatten_messages(msgs, MediaResolver())
    assert "messages[0].content[1]" in str(info.value)


def test_data_uri_decodes_in_memory_and_is_the_same_media_as_the_file(tmp_path):
    data = _png_bytes()
    (tmp_path / "a.png").write_bytes(data)
    item = resolve_media_ref(_data_uri(data), "image", MediaResolver())
    assert isinstance(item, MediaBytes) and item.data == data
    assert media_digest(item, 9) == media_digest(tmp_path / "a.png", 9)
    a, b = load_media(item, 9), load_media(tmp_path / "a.png", 9)
    assert (a.h, a.w) == (b.h, b.w) and a.pixel_values.equal(b.pixel_values)


def test_data_uri_size_cap():
    uri = _data_uri(b"\0" * 1000)
    assert decode_data_uri(uri, max_bytes=1000)[1] == b"\0" * 1000
    with pytest.raises(PartsError, match="limit"):
        decode_data_uri(uri, max_bytes=999)
    with pytest.raises(PartsError, match="malformed"):
        decode_data_uri("data:image/png;base64")


def test_root_refuses_paths_outside_it(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "ok.png").write_bytes(_png_bytes())
    (tmp_path / "secret.png").write_bytes(_png_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    res = MediaResolver(base_dir=root, root=root)
    assert resolve_media_ref("ok.png", "image", res) == str(root / "ok.png")
    for ref in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "file://" + str(tmp_path / "secret.png")):
        with pytest.raises(PartsError, match="outside the media root"):
            resolve_media_ref(ref, "image", res)
    with pytest.raises(PartsError, match="only data: URIs"):
        resolve_media_ref("ok.png", "image", MediaResolver(allow_paths=False))


def test_corrupt_in_memory_image_is_a_media_error():
    from ixc_engine.media.errors import MediaError

    with pytest.raises(MediaError, match="data: URI"):
        load_media(MediaBytes(b"not a png", "image", name="data: URI (image/png, 9 bytes)"), 9)
    with pytest.raises(ValueError, match="kind"):
        MediaBytes(b"", "audio")


def test_in_memory_video_equals_the_file(tmp_path):
    pytest.importorskip("av")
    from tests.test_media_video import write_video

    path = tmp_path / "v.mp4"
    write_video(path, 12, 4)
    item = MediaBytes(path.read_bytes(), "video", name="data: URI (video/mp4)")
    assert media_digest(item, 9) == media_digest(path, 9)
    a, b = load_media(item, 9, video_backend="av"), load_media(path, 9, video_backend="av")
    assert (a.h, a.w, a.kind) == (b.h, b.w, "video") and a.pixel_values.equal(b.pixel_values)
