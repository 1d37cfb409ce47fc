#!/usr/bin/env bash
# Provide WordNet 3.0 to nltk offline (METEOR needs it), with no download from a hub.
# Usage: setup_wordnet.sh NLTK_DATA_DIR   (writes NLTK_DATA_DIR/corpora/wordnet; safe to re-run)
# Debian's wordnet-base + wordnet-sense-index hold the WordNet 3.0 database in /usr/share/wordnet; nltk's
# reader also wants `lexnames`, the 45 fixed lexicographer file names of lexnames(5WN), written below.
set -euo pipefail
root="${1:?usage: setup_wordnet.sh NLTK_DATA_DIR}"
dest="$root/corpora/wordnet"
src="${WORDNET_SRC:-/usr/share/wordnet}"
# Files nltk's WordNetCorpusReader opens (index.sense: sense keys), all from the Debian packages.
needed="data.adj data.adv data.noun data.verb index.adj index.adv index.noun index.verb
  adj.exc adv.exc noun.exc verb.exc index.sense"

have_all() {
  local f
  for f in $needed; do [ -f "$1/$f" ] || return 1; done
}

if have_all "$dest" && [ "$(grep -c . "$dest/lexnames" 2>/dev/null)" = 45 ]; then exit 0; fi
if ! have_all "$src"; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null; }
  fi
  if ! have_all "$src"; then
    echo "setup_wordnet.sh: WordNet 3.0 is missing from $src: install Debian's wordnet-base and" \
      "wordnet-sense-index (as root: apt-get install wordnet-base wordnet-sense-index) and re-run." >&2
    exit 1
  fi
fi

# nltk refuses data that another account could write (group/world write bits), whatever the umask.
umask 022
mkdir -p "$root/corpora"
chmod go-w "$root" "$root/corpora"
rm -rf "$dest.tmp"
mkdir "$dest.tmp"
find "$src" -maxdepth 1 -type f -exec cp {} "$dest.tmp"/ \;
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
chmod -R go-w "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "setup_wordnet.sh: WordNet 3.0 ready in $dest"
