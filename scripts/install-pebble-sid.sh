#!/usr/bin/env bash
# Make Pebble 2.10.x from Debian sid runnable from a directory, installing nothing from sid.
#
#   scripts/install-pebble-sid.sh [TARGET_DIR]      (default: <repo>/.cache/pebble-sid)
#
# Bookworm's pebble (2.4.0) has no ARI and no profiles; sid's 2.10 needs only libc6 >= 2.34,
# so it runs on bookworm as it is. Adds a sid source for the mirror the machine already uses,
# pinned so that apt never picks anything from it on its own, downloads the pebble .deb and
# unpacks it into TARGET_DIR (usr/bin/pebble, usr/bin/pebble-challtestsrv). Idempotent: a
# run that finds a working TARGET_DIR/usr/bin/pebble does nothing. Needs root only when it
# has to touch apt.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${1:-"$REPO/.cache/pebble-sid"}
DEB_CACHE=${PEBBLE_SID_DEB_CACHE:-"$(dirname "$TARGET")/debs"}
# 2.10 is the version the tests were written against; a newer sid upload is taken as long as
# it is still 2.x, and named in the output.
WANTED_RE='^2\.(1[0-9]|[2-9][0-9])\.'
SOURCES_FILE=/etc/apt/sources.list.d/acme-registry-sid.sources
PREFS_FILE=/etc/apt/preferences.d/acme-registry-sid.pref
VERSION_FILE="$TARGET/.deb-version"

log() { echo "install-pebble-sid: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Pebble has no -version flag that every release understands, so "runs" means: it parses its
# flags (exit 0 on -h) and the version is what dpkg said when it was unpacked.
pebble_works() {
    local bin=$TARGET/usr/bin/pebble
    [[ -x $bin && -x $TARGET/usr/bin/pebble-challtestsrv && -s $VERSION_FILE ]] || return 1
    "$bin" -h >/dev/null 2>&1 || return 1
    [[ $(cat "$VERSION_FILE") =~ $WANTED_RE ]]
}

if pebble_works; then
    echo "pebble $(cat "$VERSION_FILE") already in $TARGET"
    exit 0
fi

# The mirror of the machine's own Debian suite: the first "deb" source that lists the
# release codename (not -updates or -security), in deb822 or one-line format.
codename() {
    # shellcheck disable=SC1091
    (. /etc/os-release && echo "${VERSION_CODENAME:?}")
}

# Prints "URI<TAB>SIGNED_BY" (SIGNED_BY may be empty).
find_mirror() {
    local suite=$1 f
    shopt -s nullglob
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ $f == "$SOURCES_FILE" ]] && continue
        awk -v suite="$suite" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") &&
                    enabled != "no" && uri != "") { print uri "\t" signed; found = 1; exit }
                types = suites = uri = signed = enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            {
                key = tolower($1); sub(/:$/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                if (key == "types") types = val
                else if (key == "suites") suites = val
                else if (key == "uris") { split(val, u, /[ \t]+/); uri = u[1] }
                else if (key == "signed-by") signed = val
                else if (key == "enabled") enabled = tolower(val)
            }
            END { if (!found) flush() }
        ' "$f" | head -n1 | grep . && return 0
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # deb [options] URI SUITE COMPONENT...
        awk -v suite="$suite" '
            $1 != "deb" { next }
            {
                i = 2; signed = ""
                if ($i ~ /^\[/) {
                    while (i <= NF) {
                        if ($i ~ /^\[?signed-by=/) {
                            s = $i; sub(/^\[?signed-by=/, "", s); sub(/\]$/, "", s); signed = s
                        }
                        if ($i ~ /\]$/) { i++; break }
                        i++
                    }
                }
                if ($(i + 1) == suite) { print $i "\t" signed; exit }
            }
        ' "$f" | head -n1 | grep . && return 0
    done
    return 1
}

sid_candidate() {
    # The sid version apt knows of, if any (its lists may not have been fetched yet).
    apt-cache madison pebble 2>/dev/null \
        | awk -F'|' '$3 ~ / sid\// { gsub(/ /, "", $2); print $2; exit }'
}

[[ $(id -u) -eq 0 ]] ||
    die "must run as root to add the sid source (or unpack pebble into $TARGET by hand)"

suite=$(codename)
mirror=$(find_mirror "$suite") ||
    die "no 'deb' source for suite $suite in /etc/apt/sources.list{,.d}"
uri=${mirror%%$'\t'*}
signed_by=${mirror#*$'\t'}
[[ -n $signed_by ]] || signed_by=/usr/share/keyrings/debian-archive-keyring.gpg

sources_text="# Written by acme-registry scripts/install-pebble-sid.sh: only pebble is taken
# from sid, by apt-get download (never installed); see ${PREFS_FILE##*/}.
Types: deb
URIs: $uri
Suites: sid
Components: main
Signed-By: $signed_by
"
# Priority -1 stops apt from ever choosing a sid version by itself, even for a package that
# only sid has; an explicit "pebble/sid" download still works.
prefs_text="# Written by acme-registry scripts/install-pebble-sid.sh: nothing is installed from sid.
Package: *
Pin: release n=sid
Pin-Priority: -1
"

changed=0
write_if_changed() {
    local path=$1 text=$2
    if [[ ! -f $path ]] || [[ $(cat "$path") != "${text%$'\n'}" ]]; then
        printf '%s' "$text" >"$path"
        changed=1
    fi
}
# The pin goes first so there is never a moment with an unpinned sid source.
write_if_changed "$PREFS_FILE" "$prefs_text"
write_if_changed "$SOURCES_FILE" "$sources_text"

if [[ $changed -eq 1 || -z $(sid_candidate) ]]; then
    log "fetching the sid package list from $uri"
    # Only the sid source: the machine's other lists stay exactly as they were.
    apt-get update -qq \
        -o Dir::Etc::SourceParts=- \
        -o "Dir::Etc::SourceList=$SOURCES_FILE" \
        -o APT::Get::List-Cleanup=false
fi
version=$(sid_candidate)
[[ -n $version ]] || die "apt knows no pebble in sid (see apt-cache madison pebble)"
[[ $version =~ $WANTED_RE ]] || die "sid has pebble $version, not 2.10 or later"

mkdir -p "$DEB_CACHE" "$(dirname "$TARGET")"
# Downloads and unpacked trees under the repo are build output, never something to commit.
if [[ $(dirname "$TARGET") == "$REPO/.cache" && ! -e $REPO/.cache/.gitignore ]]; then
    echo '*' >"$REPO/.cache/.gitignore"
fi
deb=$(find "$DEB_CACHE" -maxdepth 1 -name "pebble_${version//:/%3a}_*.deb" -print -quit)
if [[ -z $deb ]]; then
    # apt-get download writes to the current directory and, as root, drops to the _apt user
    # unless that user can write there: let it fall back rather than chmod the cache.
    (cd "$DEB_CACHE" && apt-get download -qq "pebble=$version" 2>&1 \
        | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    deb=$(find "$DEB_CACHE" -maxdepth 1 -name "pebble_${version//:/%3a}_*.deb" -print -quit)
    [[ -n $deb ]] || die "apt-get download pebble=$version left no .deb in $DEB_CACHE"
fi

# Unpack into a fresh sibling and swap, so an interrupted run never leaves a half tree that
# the check above would take for a working one.
tmp=$(mktemp -d "$(dirname "$TARGET")/.pebble-sid.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
dpkg -x "$deb" "$tmp"
dpkg-deb -f "$deb" Version >"$tmp/.deb-version"
rm -rf "$TARGET"
mv "$tmp" "$TARGET"
trap - EXIT

pebble_works || die "unpacked $deb into $TARGET but $TARGET/usr/bin/pebble does not run"
echo "pebble $(cat "$VERSION_FILE") in $TARGET"
