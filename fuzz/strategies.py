"""Hypothesis strategies for the fuzz targets: valid inputs of every kind, then mutated.

Random bytes alone rarely get past a format's magic number, so each strategy starts from valid
inputs (small images in every format and pixel mode, real model manifests, well-formed CSVs and
request bodies) and applies structure-aware edits (image dimensions in the header, with the
checksum fixed; JSON values replaced by any JSON; CSV fields holding quotes, NULs, control
characters, ``..`` and absolute paths) and blind byte mutations (bit flips, interesting integers,
cuts, insertions, duplications, truncation).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import struct
import zlib

from hypothesis import strategies as st

# ---------------------------------------------------------------------- byte mutations
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF)  # fmt: skip


def mutate(data: bytes, rnd, max_ops: int = 4) -> bytes:
    """``data`` after 0..max_ops blind mutations chosen by ``rnd`` (a :class:`random.Random`)."""
    data = bytearray(data)
    for _ in range(rnd.randint(0, max_ops)):
        n = len(data)
        op = rnd.choice(("flip", "byte", "int", "cut", "insert", "dup", "truncate"))
        pos = rnd.randrange(n) if n else 0
        if op == "flip" and n:
            data[pos] ^= 1 << rnd.randrange(8)
        elif op == "byte" and n:
            data[pos] = rnd.choice((0, 0xFF, 0x7F, 0x80, rnd.randrange(256)))
        elif op == "int" and n:
            size = rnd.choice((2, 4))
            v = rnd.choice(INTERESTING) & (2 ** (8 * size) - 1)
            data[pos : pos + size] = v.to_bytes(size, rnd.choice(("big", "little")))
        elif op == "cut" and n:
            del data[pos : pos + rnd.randint(1, 64)]
        elif op == "insert":
            data[pos:pos] = rnd.randbytes(rnd.randint(1, 32))
        elif op == "dup" and n:
            data[pos:pos] = data[pos : pos + rnd.randint(1, 256)] * rnd.randint(1, 8)
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


# Blind mutations are many small random choices; drawing each through Hypothesis costs ~0.1 ms, so
# Hypothesis draws one seed and a plain Random makes them (the inputs stay reproducible).
RANDOM = st.integers(0, 2**64 - 1).map(__import__("random").Random)


def mutated(seed: bytes, max_ops: int = 4) -> st.SearchStrategy[bytes]:
    """``seed`` after 0..max_ops blind mutations."""
    return RANDOM.map(lambda rnd: mutate(seed, rnd, max_ops))


# ---------------------------------------------------------------------- images
def _save(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.cache
def image_seeds() -> tuple[bytes, ...]:
    """Small valid files in every supported format and pixel mode (and a few unsupported)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), "RGB")
    thin = Image.fromarray(rng.integers(0, 255, (2, 40, 3), dtype=np.uint8), "RGB")
    out = [
        _save(rgb, "JPEG"),
        _save(rgb, "JPEG", progressive=True, quality=50),
        _save(rgb.convert("L"), "JPEG"),
        _save(rgb.convert("CMYK"), "JPEG"),
        _save(thin, "JPEG"),
        _save(rgb, "PNG"),
        _save(rgb.convert("RGBA"), "PNG"),
        _save(rgb.convert("LA"), "PNG"),
        _save(rgb.convert("P"), "PNG", transparency=0),
        _save(rgb.convert("1"), "PNG"),
        _save(Image.fromarray((rng.integers(0, 65535, (8, 8))).astype(np.uint16)), "PNG"),
        _save(thin, "PNG"),
        _save(rgb, "GIF"),
        _save(rgb, "BMP"),
        _save(rgb.convert("P"), "BMP"),
        _save(rgb, "TIFF"),
        _save(rgb, "TIFF", compression="tiff_lzw"),
        _save(rgb.convert("CMYK"), "TIFF"),
        _save(rgb.convert("F"), "TIFF"),
        _save(rgb, "WEBP", quality=50),
        _save(rgb.convert("RGBA"), "WEBP", lossless=True),
        _save(rgb, "ICO"),  # unsupported: must be refused, not parsed
        _save(rgb, "PPM"),
    ]
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out.append(buf.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6
    out.append(_save(rgb, "JPEG", exif=exif.tobytes()))
    return tuple(out)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


DIMS = st.one_of(
    st.integers(0, 70000),
    st.sampled_from(
        [0, 1, 2, 51, 255, 256, 9000, 9460, 65500, 65535, 100000, 2**31 - 1, 2**32 - 1]
    ),
)


@st.composite
def png_with_header(draw) -> bytes:
    """A PNG whose IHDR (dimensions, bit depth, colour type, interlace) is anything, with a valid
    CRC so the header is believed, and a little compressed data."""
    w, h = draw(DIMS), draw(DIMS)
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]))
    ctype = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
    interlace = draw(st.sampled_from([0, 1, 2]))
    ihdr = struct.pack(">IIBBBBB", w & 0xFFFFFFFF, h & 0xFFFFFFFF, depth, ctype, 0, 0, interlace)
    raw = draw(st.binary(max_size=256))
    chunks = [_png_chunk(b"IHDR", ihdr)]
    if ctype == 3 and draw(st.booleans()):
        chunks.append(_png_chunk(b"PLTE", draw(st.binary(min_size=3, max_size=48))))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(raw)))
    chunks.append(_png_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


@st.composite
def header_edited(draw) -> bytes:
    """A valid JPEG, GIF or BMP with its dimensions rewritten in the header."""
    seeds = image_seeds()
    kind = draw(st.sampled_from(["jpeg", "gif", "bmp"]))
    w, h = draw(DIMS) & 0xFFFF, draw(DIMS) & 0xFFFF
    if kind == "jpeg":
        data = bytearray(seeds[0])
        i = data.find(b"\xff\xc0")
        if i < 0:
            return bytes(data)
        data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    elif kind == "gif":
        data = bytearray(seeds[12])
        data[6:10] = struct.pack("<HH", w, h)  # logical screen
        j = data.find(b"\x2c")
        if j > 0 and draw(st.booleans()):
            data[j + 5 : j + 9] = struct.pack("<HH", w, h)  # the frame too
    else:
        data = bytearray(seeds[13])
        sw = draw(st.sampled_from([w, -w, 2**31 - 1]))
        sh = draw(st.sampled_from([h, -h, -(2**31)]))
        data[18:26] = struct.pack("<ii", sw, sh)
    return bytes(data)


def image_bytes() -> st.SearchStrategy[bytes]:
    seeds = st.sampled_from(image_seeds())
    return st.one_of(
        seeds.flatmap(mutated),
        png_with_header().flatmap(lambda b: mutated(b, 2)),
        header_edited().flatmap(lambda b: mutated(b, 1)),
        st.binary(max_size=512),
        seeds.map(lambda b: b[: len(b) // 2]),
    )


def decode_inputs():
    return st.tuples(image_bytes(), st.sampled_from([None, 1, 64, 224, 256, 292, 1000, 5000]))


# ---------------------------------------------------------------------- labels CSV
ID_NAMES = ["id", "image", "file", "filename", "path", "img", "Id", " id ", "breed", "label", ""]
LABEL_NAMES = ["label", "breed", "class", "category", "species", "target", "y", "x", ""]
NASTY = "\x00\x01\x07\x08\t\n\r\x0b\x0c\x1b\x7f\x85\u2028\u2029\ufeff\u202e\"',;\\ é猫🐶"
CELL = st.text(alphabet=st.sampled_from(list(NASTY + "abcXYZ019 _-./")), max_size=12)
IDS = st.one_of(
    st.sampled_from(["a", "a.jpg", "b", "c d", "sub/e", "sub/e.jpg", "é", "labels", "sub",
                     "../outside", "../outside.jpg", "/etc/passwd", "./a", "sub/../a",
                     "sub/../../outside", "//a", "a\x00", ".", "", " a ", "A"]),
    CELL,
)  # fmt: skip


GOOD_IDS = st.sampled_from(["a", "a.jpg", "b", "b.png", "c d", "sub/e", "sub/e.jpg", "é", "./a"])
GOOD_LABELS = st.sampled_from(
    ["pug", "boxer", "Shih-Tzu", "golden retriever", "猫", "a,b", 'say "hi"']
)


@st.composite
def csv_inputs(draw):
    """(CSV bytes, id_col, label_col, allow_outside): 3 in 4 a plausible labels file with one or
    two odd cells, the others anything."""
    import csv

    if draw(st.integers(0, 3)) > 0:
        header = list(draw(st.sampled_from([("id", "label"), ("id", "breed"), ("image", "class"),
                                            ("file", "category", "notes"), ("path", "y")])))  # fmt: skip
        rows = [[draw(GOOD_IDS), draw(GOOD_LABELS), "x"][: len(header)]
                for _ in range(draw(st.integers(1, 8)))]  # fmt: skip
        for _ in range(draw(st.integers(0, 2))):  # an odd cell or two
            r = draw(st.integers(0, len(rows) - 1))
            c = draw(st.integers(0, len(header) - 1))
            rows[r][c] = draw(IDS if c == 0 else CELL)
    else:
        ncols = draw(st.integers(1, 4))
        header = [draw(st.one_of(st.sampled_from(ID_NAMES + LABEL_NAMES), CELL))
                  for _ in range(ncols)]  # fmt: skip
        rows = [[draw(IDS) if c == 0 else draw(st.one_of(CELL, GOOD_LABELS))
                 for c in range(draw(st.integers(0, ncols + 1)))]
                for _ in range(draw(st.integers(0, 8)))]  # fmt: skip
    buf = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE]))
    delim = draw(st.sampled_from([","] * 6 + [";", "\t"]))
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    try:
        w = csv.writer(buf, quoting=quoting, delimiter=delim, lineterminator=eol, escapechar="\\")
        w.writerow(header)
        w.writerows(rows)
        text = buf.getvalue()
    except csv.Error:
        text = delim.join(header) + eol + eol.join(delim.join(r) for r in rows)
    if draw(st.integers(0, 3)) == 0:
        text = text.replace(",", draw(st.sampled_from([", ", ',"', '" ,', ",,"])))
    enc = draw(st.sampled_from(["utf-8"] * 4 + ["utf-8-sig", "utf-16", "utf-16-le", "utf-32",
                                                 "latin-1", "cp1252"]))  # fmt: skip
    data = text.encode(enc, errors="replace")
    if draw(st.integers(0, 4)) == 0:
        data = draw(mutated(data, 2))
    id_col = draw(st.one_of(st.none(), st.none(), st.sampled_from(header + ["nope"])))
    label_col = draw(st.one_of(st.none(), st.none(), st.sampled_from(header + ["nope"])))
    return data, id_col, label_col, draw(st.booleans())


# ---------------------------------------------------------------------- manifests
SEEDS = os.path.join(os.path.dirname(__file__), "seeds", "manifests")


@functools.cache
def manifest_seeds() -> dict[str, dict]:
    out = {}
    for name in sorted(os.listdir(SEEDS)):
        with open(os.path.join(SEEDS, name), encoding="utf-8") as fh:
            out[name.removesuffix(".json")] = json.load(fh)
    return out


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["stack", "finetune", "ensemble", "stackvision-model", "..", "/etc",
                       "weights.safetensors", "members/00-stack", "lite0", "logreg", "mlp"]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value, delete=False):
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


@st.composite
def mutated_json(draw, seed):
    obj = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(obj))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "wrap", "number"]))
        if op == "delete" and path:
            obj = _set(obj, path, None, delete=True)
        elif op == "add" and isinstance(_get(obj, path), dict):
            _get(obj, path)[draw(st.text(max_size=10))] = draw(JSON)
        elif op == "wrap":
            obj = _set(obj, path, [_get(obj, path)])
        elif op == "number":
            obj = _set(obj, path, draw(st.sampled_from([0, -1, 1, 2**63, 1e308, -0.0, 3.5, True])))
        else:
            obj = _set(obj, path, draw(JSON))
    return obj


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


@st.composite
def manifest_inputs(draw):
    """(manifest.json bytes, other files of the model directory)."""
    seeds = manifest_seeds()
    kind = draw(st.sampled_from(sorted(seeds)))
    obj = draw(st.one_of(mutated_json(seeds[kind]), st.just(seeds[kind]), JSON))
    text = json.dumps(obj, indent=draw(st.sampled_from([None, 2])), allow_nan=True)
    how = draw(st.integers(0, 9))
    if how == 0:
        data = draw(mutated(text.encode(), 3))
    elif how == 1:
        data = text.encode(draw(st.sampled_from(["utf-16", "latin-1", "utf-8-sig"])), "replace")
    elif how == 2:
        depth = draw(st.integers(100, 100_000))
        data = b"[" * depth + b"]" * draw(st.sampled_from([depth, 0]))  # nesting bomb
    else:
        data = text.encode("utf-8", "surrogatepass")
    files = {"weights.safetensors": b""}
    members = {
        "members/00-stack/manifest.json": json.dumps(seeds["stack"]).encode(),
        "members/01-finetune/manifest.json": json.dumps(seeds["finetune"]).encode(),
        "members/00-stack/weights.safetensors": b"",
        "members/01-finetune/weights.safetensors": b"",
    }
    if kind == "ensemble" or draw(st.booleans()):
        files.update(members)
        if draw(st.integers(0, 3)) == 0:  # a damaged member
            member = draw(st.sampled_from(["stack", "finetune"]))
            bad = draw(mutated_json(seeds[member]))
            key = f"members/{'00-stack' if member == 'stack' else '01-finetune'}/manifest.json"
            files[key] = json.dumps(bad).encode()
    if draw(st.integers(0, 9)) == 0:
        files.pop("weights.safetensors")
    return data, files


# ---------------------------------------------------------------------- request bodies
def _tiny_images():
    return [s for s in image_seeds()[:6]]


@st.composite
def multipart_body(draw):
    boundary = draw(st.sampled_from(["XyZ", "----b", "a" * 70, 'b"q', ""]))
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(
            st.sampled_from(["file", "file", "image", "top_k", "", 'fi"le', "file\r\nX: y"])
        )
        filename = draw(st.one_of(st.none(), st.sampled_from(["a.jpg", "", "../x.jpg", 'q"uote',
                                                                "é.png", "a\x00b"]), CELL))  # fmt: skip
        ctype = draw(st.one_of(st.none(), st.sampled_from(["image/jpeg", "image/png", "text/plain",
                               "application/octet-stream", "image/", "x"])))  # fmt: skip
        body = draw(st.one_of(st.sampled_from(_tiny_images()), st.binary(max_size=64),
                              st.integers(0, 4096).map(lambda n: b"\xff" * n)))  # fmt: skip
        disp = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        head = f"Content-Disposition: {disp}\r\n" + (f"Content-Type: {ctype}\r\n" if ctype else "")
        parts.append(b"--" + boundary.encode() + b"\r\n" + head.encode("utf-8", "replace")
                     + b"\r\n" + body + b"\r\n")  # fmt: skip
    end = draw(st.sampled_from([b"--" + boundary.encode() + b"--\r\n", b"", b"--"]))
    data = b"".join(parts) + end
    data = draw(mutated(data, 2)) if draw(st.integers(0, 3)) == 0 else data
    ctype = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}",
                                  f'multipart/form-data; boundary="{boundary}"',
                                  "multipart/form-data", "Multipart/Form-Data; boundary=XyZ"]))  # fmt: skip
    return data, ctype


@st.composite
def json_body(draw):
    b64 = st.sampled_from(_tiny_images()).map(lambda b: base64.b64encode(b).decode())
    item = st.one_of(
        b64,
        b64.map(lambda s: "data:image/png;base64," + s),
        st.fixed_dictionaries({"name": st.one_of(CELL, JSON), "data": st.one_of(b64, JSON)}),
        st.text(max_size=20),
        JSON,
        st.integers(0, 6000).map(lambda n: "A" * n),
    )
    body = {"images": draw(st.one_of(st.lists(item, max_size=5), JSON))}
    if draw(st.booleans()):
        body["top_k"] = draw(st.one_of(st.integers(-3, 10), JSON))
    obj = draw(st.one_of(st.just(body), JSON, st.just(body)))
    data = json.dumps(obj).encode()
    data = draw(mutated(data, 2)) if draw(st.integers(0, 4)) == 0 else data
    ctype = draw(st.sampled_from(["application/json", "application/json; charset=utf-8",
                                  "APPLICATION/JSON"]))  # fmt: skip
    return data, ctype


@st.composite
def http_inputs(draw):
    data, ctype = draw(
        st.one_of(
            multipart_body(),
            json_body(),
            st.tuples(
                st.binary(max_size=256),
                st.sampled_from(
                    [
                        "",
                        "text/plain",
                        "image/png",
                        "multipart/form-data; boundary=",
                        "application/json",
                        "\x00",
                    ]
                ),
            ),  # fmt: skip
        )
    )
    return data, ctype, draw(st.integers(1, 5))
