"""Partial JPEG decoding (pipeline/_jpegcrop.c): a window decodes to exactly the pixels a
whole decode has there, at every scale, with restart markers (decoding only the intervals
under the window) or without, and crop_into built on it gives the crops of whole decodes, with
the same draws; damage is still found and named. restart_index re-encodes a JPEG with markers
that tile its MCU rows and the same pixels."""

from __future__ import annotations

import concurrent.futures
import io

import numpy as np
import pytest
from PIL import Image

from pipeline import transforms
from tests import helpers
from tools.bench import photo_like

pytestmark = pytest.mark.skipif(
    not (transforms.fast_path_available() and transforms.window_decode_available()),
    reason="pipeline._jpegcrop not built (it needs libjpeg-turbo's headers: BUILD.md)",
)


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def photos():
    """4:2:0 (the usual), 4:4:4, 4:2:2, grayscale, progressive, and sizes no MCU divides."""
    seeds, _ = photo_like.load_seeds(0)
    rng = np.random.default_rng(11)
    make = lambda size: photo_like.make_image(rng, seeds, size)
    return [
        _jpeg(make((1203, 907))),
        _jpeg(make((500, 375)), subsampling=0),
        _jpeg(make((333, 500)), subsampling=1),
        _jpeg(make((641, 479)).convert("L")),
        _jpeg(make((800, 600)), progressive=True),
    ]


@pytest.fixture(scope="module")
def indexed(photos):
    """The photos with restart markers every 1, 2 or 3 MCUs (or what divides their rows)."""
    from pipeline import _jpegcrop

    return [_jpegcrop.restart_index(blob, 1 + i % 3) for i, blob in enumerate(photos)]


def test_restart_index_keeps_the_pixels_and_tiles_the_rows(photos):
    """The same pixels in the same mode, EXIF and ICC profile kept; baseline; markers every k
    MCUs, k <= max_mcus dividing a row's MCUs. CMYK too."""
    from pipeline import _jpegcrop

    seeds, _ = photo_like.load_seeds(0)
    rng = np.random.default_rng(5)
    icc = b"\0\0\0\x10not a real profile"
    marked = _jpeg(
        photo_like.make_image(rng, seeds, (208, 160)), icc_profile=icc, exif=b"Exif\0\0MM"
    )
    cmyk = _jpeg(photo_like.make_image(rng, seeds, (150, 100)).convert("CMYK"))
    for blob in [*photos, marked, cmyk]:
        for max_mcus in (1, 2, 4, 7):
            out = _jpegcrop.restart_index(blob, max_mcus)
            before, after = Image.open(io.BytesIO(blob)), Image.open(io.BytesIO(out))
            assert after.mode == before.mode and after.size == before.size
            np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
            interval, row = helpers.jpeg_restart_interval(out), helpers.jpeg_mcus_per_row(out)
            assert 1 <= interval <= max_mcus and row % interval == 0
            assert not after.info.get("progressive") and after.layer == before.layer
            if blob is cmyk:  # a window, from its intervals, as the whole stream decodes it
                whole = np.frombuffer(
                    _jpegcrop.decode_crop(out, 0, 0, 150, 100, 1, 4, 1)[0], np.uint8
                )
                pixels, h, w, x0 = _jpegcrop.decode_crop(out, 70, 40, 130, 90, 1, 4, True)
                window = np.frombuffer(pixels, np.uint8).reshape(h, w, 4)[:, 70 - x0 : 130 - x0]
                np.testing.assert_array_equal(window, whole.reshape(100, 150, 4)[40:90, 70:130])
            if blob is marked:
                assert after.info["icc_profile"] == icc and after.info["exif"] == b"Exif\0\0MM"
    with pytest.raises(ValueError, match="max_mcus"):
        _jpegcrop.restart_index(photos[0], 0)
    with pytest.raises(ValueError, match="JPEG"):
        _jpegcrop.restart_index(b"\xff\xd8not a jpeg\xff\xd9", 2)


@pytest.mark.parametrize("restarts", [False, True])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_a_window_is_exactly_the_whole_decode_there(photos, indexed, scale, channels, restarts):
    from pipeline import _jpegcrop

    rng = np.random.default_rng(scale * 10 + channels)
    for blob in indexed if restarts else photos:
        whole = transforms.decode_scaled(blob, Image.open(io.BytesIO(blob)).size, scale, channels)
        rows, cols = whole.shape[:2]
        for _ in range(12):
            left, right = sorted(rng.choice(cols + 1, 2, replace=False).tolist())
            top, bottom = sorted(rng.choice(rows + 1, 2, replace=False).tolist())
            pixels, h, w, x0 = _jpegcrop.decode_crop(
                blob, left, top, right, bottom, scale, channels, transforms.FAST_DCT
            )
            window = np.frombuffer(pixels, np.uint8).reshape(h, w, channels)
            assert h == bottom - top and x0 <= left and x0 + w >= right
            np.testing.assert_array_equal(
                window[:, left - x0 : right - x0], whole[top:bottom, left:right]
            )


def _decodes_as(blob: bytes, whole: np.ndarray, left, top, right, bottom) -> bool:
    """Whether decode_crop gives `whole`'s pixels in the window (False if it raises)."""
    from pipeline import _jpegcrop

    try:
        pixels, h, w, x0 = _jpegcrop.decode_crop(blob, left, top, right, bottom, 1, 3, True)
    except ValueError:
        return False
    got = np.frombuffer(pixels, np.uint8).reshape(h, w, 3)[:, left - x0 : right - x0]
    return np.array_equal(got, whole[top:bottom, left:right])


def test_only_the_intervals_under_a_window_are_read(indexed, photos):
    """Damage to the entropy-coded data above and left of a window leaves it exactly as the
    whole decode of the undamaged JPEG: that data is not read. Without restart markers the
    same damage reaches the window (every row above it is entropy-decoded)."""
    for blob in (indexed[0], photos[0]):  # 1203 x 907, 4:2:0
        sos = blob.index(b"\xff\xda")
        scan = sos + 2 + int.from_bytes(blob[sos + 2 : sos + 4], "big")
        end = blob.find(b"\xff\xd0", scan)  # the first restart marker
        end = scan + 200 if end < 0 else end
        damaged = blob[:scan] + bytes(end - scan) + blob[end:]  # the first MCU's data zeroed
        whole = transforms.decode_scaled(blob, (1203, 907), 1, 3)
        assert not _decodes_as(damaged, whole, 0, 0, 64, 64)  # the damage is real
        assert _decodes_as(damaged, whole, 600, 500, 900, 700) == (blob is indexed[0])


def test_restart_markers_out_of_place_are_refused_not_misread(indexed):
    """A marker missing where the header's restart interval puts one (in the window, or above
    it, shifting every interval after it) makes libjpeg refuse the window: the intervals are
    found by their markers, and the decoder checks each one's length against the interval."""
    from pipeline import _jpegcrop

    blob = indexed[1]  # 500 x 375, 4:4:4: 63 MCUs a row, intervals of 1 MCU
    sos = blob.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(blob[sos + 2 : sos + 4], "big")
    markers = [
        i for i in range(scan, len(blob) - 1) if blob[i] == 0xFF and 0xD0 <= blob[i + 1] <= 0xD7
    ]
    assert helpers.jpeg_restart_interval(blob) == 1 and len(markers) == 63 * 47 - 1
    eight = markers[63 * 20 : 63 * 20 + 8]  # eight in a row: the numbering still runs on
    for gone in ([markers[10]], [markers[63 * 20 + 5]], eight):  # in the window; above it
        damaged = b"".join(blob[a + 2 : b] for a, b in zip([-2, *gone], [*gone, len(blob)]))
        assert len(damaged) == len(blob) - 2 * len(gone)
        with pytest.raises(ValueError, match="JPEG"):
            _jpegcrop.decode_crop(damaged, 0, 0, 200, 300, 1, 3, True)
        for window in ((300, 200, 480, 370), (300, 200, 480, 280)):  # to the bottom, or not
            with pytest.raises(ValueError, match="JPEG"):
                _jpegcrop.decode_crop(damaged, *window, 1, 3, True)


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _gray_block(ac: int, app_bytes: int) -> bytes:
    """An 8x8 grayscale baseline JPEG (hand-coded: one Huffman code per symbol) whose one AC
    coefficient is `ac` (11 bits: out of the range libjpeg encodes), after `app_bytes` of
    APP1 data."""
    tables = bytes([0x00, 1, *[0] * 15, 0, 0x10, 1, 1, *[0] * 14, 0x0B, 0x00])
    bits = "00" + format(ac, "011b") + "10"  # DC 0; AC (run 0, size 11); end of block
    bits += "1" * (-len(bits) % 8)
    data = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    return b"".join(
        [
            b"\xff\xd8",
            _segment(0xE1, b"Exif\0\0" + bytes(app_bytes)),
            _segment(0xDB, bytes([0] + [1] * 64)),
            _segment(0xC0, bytes([8, 0, 8, 0, 8, 1, 1, 0x11, 0])),
            _segment(0xC4, tables),
            _segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0])),
            data.replace(b"\xff", b"\xff\x00"),
            b"\xff\xd9",
        ]
    )


def test_restart_index_fails_cleanly_after_its_output_grew():
    """A coefficient libjpeg cannot encode, found after the output outgrew its first buffer
    (the 10 kB of markers are written first): a ValueError, the buffers freed once."""
    from pipeline import _jpegcrop

    for app_bytes in (100, 10_000, 60_000):
        blob = _gray_block(2047, app_bytes)
        assert _jpegcrop.decode_crop(blob, 0, 0, 8, 8, 1, 1, True)[1:] == (8, 8, 0)
        with pytest.raises(ValueError, match="DCT coefficient out of range"):
            _jpegcrop.restart_index(blob, 2)


def test_the_frame_header_is_found_past_markers_without_a_length(indexed):
    """TEM (FF 01) has no length field. Read as a segment, it would send the walk to the
    frame header into an APP1 segment that leads it on to an FF C0 inside the quantisation
    table; the excerpt's size, written there, would give the window other pixels."""
    from pipeline import _jpegcrop

    blob = indexed[3]  # 641 x 479 grayscale
    sos = blob.index(b"\xff\xda")
    dqt = blob.index(b"\xff\xdb")
    value = dqt + 5 + 40  # a quantisation value: FF C0 there is still a valid table
    fake = blob[:value] + b"\xff\xc0" + blob[value + 2 :]
    whole = transforms.decode_scaled(fake, (641, 479), 1, 1)[:, :, 0]
    app_end = 4 + 2 + 65535
    land = 4 + 0xFFE1  # where the walk lands, reading FF E1 as TEM's length
    payload = bytearray(65533)
    at = land - (4 + 4)
    payload[at : at + 4] = b"\xff\xe2" + (app_end + value - 2 - land - 2).to_bytes(2, "big")
    evil = b"\xff\xd8\xff\x01\xff\xe1\xff\xff" + bytes(payload) + fake[2:]
    assert evil[app_end + value - 2 : app_end + value] == b"\xff\xc0" and sos > value
    np.testing.assert_array_equal(transforms.decode_scaled(evil, (641, 479), 1, 1)[:, :, 0], whole)
    pixels, h, w, x0 = _jpegcrop.decode_crop(evil, 300, 200, 400, 260, 1, 1, True)
    window = np.frombuffer(pixels, np.uint8).reshape(h, w)[:, 300 - x0 : 400 - x0]
    np.testing.assert_array_equal(window, whole[200:260, 300:400])


def test_crop_into_gives_the_crops_of_whole_decodes(photos, indexed, monkeypatch):
    """Bit-identical, at full scale and at every reduction (the resize of a reduced decode's
    fractional box samples the same pixels wherever the window starts)."""
    aug = transforms.Augmentation(image_size=96)
    scaled = 0
    for i, blob in enumerate(photos + indexed):
        for k in range(24):
            plan = transforms.plan_crop(blob, aug, np.random.default_rng((i, k)))
            slots, draws = [], []
            for build in (transforms._jpegcrop, None):  # pylint: disable=protected-access
                with monkeypatch.context() as patch:
                    patch.setattr(transforms, "_jpegcrop", build)
                    rng = np.random.default_rng((i, k))
                    slots.append(np.zeros((96, 96, 3), np.uint8))
                    transforms.crop_into(slots[-1], blob, aug, rng)
                    draws.append(rng.bit_generator.state)
            assert draws[0] == draws[1]
            np.testing.assert_array_equal(slots[0], slots[1])
            scaled += plan.scale > 1
    assert scaled >= 10


def test_damage_below_the_window_is_still_found(photos):
    """A file cut short is decoded whole (no end-of-image marker), so PIL refuses it even when
    the crop lies above the cut."""
    blob = photos[0][: len(photos[0]) * 3 // 4]
    aug = transforms.Augmentation(image_size=64, crop_scale=(0.08, 0.1))
    for seed in range(8):
        plan = transforms.plan_crop(blob, aug, np.random.default_rng(seed))
        if plan.box[3] < 907 // 2:  # a crop in the top half, above the cut
            break
    else:
        pytest.fail("no crop in the top half in 8 draws")
    with pytest.raises(OSError, match="truncated"):
        transforms.crop_into(
            np.empty((64, 64, 3), np.uint8), blob, aug, rng=np.random.default_rng(seed)
        )


def test_threads_decode_at_once_and_alike(photos):
    """The GIL is released while libjpeg works (Grain decodes in threads): 4 threads decoding
    the same windows give what one thread gives."""
    from pipeline import _jpegcrop

    jobs = [(blob, 0, 8, 150, 90, scale, 3, True) for blob in photos for scale in (1, 2)] * 4
    serial = [_jpegcrop.decode_crop(*job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda job: _jpegcrop.decode_crop(*job), jobs)) == serial


def test_bad_arguments_and_bytes_raise_value_errors(photos):
    from pipeline import _jpegcrop

    with pytest.raises(ValueError, match="outside"):
        _jpegcrop.decode_crop(photos[1], 0, 0, 501, 10, 1, 3, True)
    with pytest.raises(ValueError, match="bad arguments"):
        _jpegcrop.decode_crop(photos[1], 0, 0, 10, 10, 3, 3, True)
    with pytest.raises(ValueError, match="4 channels"):
        _jpegcrop.decode_crop(photos[1], 0, 0, 10, 10, 1, 4, True)
    with pytest.raises(ValueError, match="JPEG"):
        _jpegcrop.decode_crop(b"\xff\xd8not a jpeg\xff\xd9", 0, 0, 10, 10, 1, 3, True)
