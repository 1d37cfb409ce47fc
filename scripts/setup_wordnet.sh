#!/usr/bin/env bash
# Provide WordNet 3.0 to nltk offline (METEOR needs it): Debian's wordnet-base + wordnet-sense-index hold
# the database; nltk's reader also wants `lexnames`, the 45 fixed lexicographer file names (lexnames(5WN)).
set -euo pipefail
dest="${1:?usage: setup_wordnet.sh NLTK_DATA_DIR}/corpora/wordnet"
src=/usr/share/wordnet
if [ -f "$dest/lexnames" ] && [ -f "$dest/data.noun" ]; then exit 0; fi
if [ ! -f "$src/data.noun" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null; }
  else
    echo "WordNet 3.0 is missing: install Debian's wordnet-base and wordnet-sense-index (as root) and re-run." >&2
    exit 1
  fi
fi
mkdir -p "$dest.tmp"
cp "$src"/* "$dest.tmp"/ 2>/dev/null || true
[ -f "$src/../wordnet-sense-index/index.sense" ] && cp "$src/../wordnet-sense-index/index.sense" "$dest.tmp"/ || true
i=0
for name in adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body \
    noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive \
    noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity \
    noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition \
    verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion \
    verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl; do
  case "$name" in adj.*) pos=3 ;; adv.*) pos=4 ;; noun.*) pos=1 ;; verb.*) pos=2 ;; esac
  printf '%02d\t%s\t%d\n' "$i" "$name" "$pos"
  i=$((i + 1))
done > "$dest.tmp/lexnames"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
