#!/usr/bin/env bash
# Download a Wikipedia dump and turn it into the text files convmodel trains on.
#
#   data/get_wiki.sh LANG DATE [OUTPUT_DIR]      e.g.  data/get_wiki.sh en 20240601
#
# Writes OUTPUT_DIR (default data/wiki-LANG-DATE)/{train,valid,test}.txt in the format that
# train_tokenizer.py and prepare_train_data.py read: one paragraph per line, a blank line
# between articles. Articles go to valid.txt and test.txt by their id (0.5% each), so a rerun
# on another dump of the same language keeps most held-out articles held out.
#
# Needs curl and WikiExtractor (pip install "wikiextractor>=3.1"; 3.0.x fails on Python 3.11).
# The dump is kept in OUTPUT_DIR/raw/ and a broken download resumes where it stopped.
# English is ~22 GB compressed and takes hours to extract; try a small language (e.g. "simple"
# for Simple English, ~300 MB) first. EXTRACT_ARGS passes options to WikiExtractor
# (default "--no-templates": much faster, at the cost of text produced by templates).
set -euo pipefail

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

if [[ $# -ge 1 && ($1 == -h || $1 == --help) ]]; then
    usage 0
fi
if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "error: expected LANG and DATE (and optionally OUTPUT_DIR)." >&2
    usage 2 >&2
fi

WIKI_LANG=$1
DATE=$2
OUTPUT_DIR=${3:-data/wiki-${WIKI_LANG}-${DATE}}
EXTRACT_ARGS=${EXTRACT_ARGS:---no-templates}
PYTHON=${PYTHON:-python}

if [[ ! $WIKI_LANG =~ ^[a-z][a-z_-]*$ ]]; then
    echo "error: LANG '$WIKI_LANG' is not a Wikipedia language code such as en, ja, simple." >&2
    exit 2
fi
if [[ ! $DATE =~ ^([0-9]{8}|latest)$ ]]; then
    echo "error: DATE '$DATE' must be a dump date YYYYMMDD (see https://dumps.wikimedia.org/${WIKI_LANG}wiki/) or 'latest'." >&2
    exit 2
fi
if ! command -v curl >/dev/null; then
    echo "error: curl is not installed." >&2
    exit 1
fi
if ! "$PYTHON" -c "import wikiextractor" 2>/dev/null; then
    echo "error: WikiExtractor is not installed for $PYTHON: pip install 'wikiextractor>=3.1'" >&2
    exit 1
fi

NAME="${WIKI_LANG}wiki-${DATE}-pages-articles.xml.bz2"
URL="https://dumps.wikimedia.org/${WIKI_LANG}wiki/${DATE}/${NAME}"
mkdir -p "$OUTPUT_DIR/raw"
DUMP="$OUTPUT_DIR/raw/$NAME"

if [[ -f $DUMP ]]; then
    echo "Using the dump already downloaded: $DUMP"
else
    echo "Downloading $URL"
    curl --fail --location --retry 5 --continue-at - --output "$DUMP.part" "$URL"
    mv "$DUMP.part" "$DUMP"
fi

echo "Extracting text into $OUTPUT_DIR/{train,valid,test}.txt"
# WikiExtractor writes one JSON article per line to stdout; the converter below splits the
# articles' text into paragraphs (one per line) and the articles into the three files.
# shellcheck disable=SC2086  # EXTRACT_ARGS holds several options
"$PYTHON" -m wikiextractor.WikiExtractor "$DUMP" --json $EXTRACT_ARGS --processes "$(nproc)" --quiet --output - |
    "$PYTHON" -c '
import json
import os
import sys

output_dir = sys.argv[1]
files = {name: open(os.path.join(output_dir, name + ".txt"), "w", encoding="utf-8") for name in ("train", "valid", "test")}
counts = dict.fromkeys(files, 0)
for line in sys.stdin:
    article = json.loads(line)
    # Lines under 20 characters are section titles ("History.") or list debris, not prose.
    paragraphs = [p.strip() for p in article["text"].split("\n") if len(p.strip()) >= 20]
    if not paragraphs:
        continue  # redirects and stubs
    bucket = int(article["id"]) % 200
    split = "valid" if bucket == 0 else "test" if bucket == 1 else "train"
    out = files[split]
    if counts[split]:
        out.write("\n")
    out.write("\n".join(paragraphs) + "\n")
    counts[split] += 1
    total = sum(counts.values())
    if total % 100000 == 0:
        print(f"{total} articles", file=sys.stderr, flush=True)
for name, f in files.items():
    f.close()
    size = os.path.getsize(f.name) / 1e6
    print(f"{f.name}: {counts[name]} articles, {size:.1f} MB")
' "$OUTPUT_DIR"
