#!/usr/bin/env bash
# Removes the atmguard service installed by deploy/install.sh.
#
#   sudo deploy/uninstall.sh            # stop, disable, remove unit, udev rule, /opt/atmguard
#   sudo deploy/uninstall.sh --purge    # also the journal, config, credentials and the user,
#                                       # but only when nothing in the journal still waits to be synced
#   deploy/uninstall.sh --dry-run [--purge]   # prints what it would do, changes nothing
#
# /var/lib/atmguard holds the evidence journal and sealed snapshots. Records not yet on the central
# server (or rejected by it: dead letters) exist nowhere else, so deleting them destroys evidence
# of fraud attempts. Without --purge it is always kept, with /etc/atmguard and the atmguard user
# (whose uid owns the evidence files; a later account reusing that uid could read them).
# --purge first asks `atmguard outbox` and refuses unless the outbox is provably empty.
set -euo pipefail

readonly SERVICE=atmguard
readonly PREFIX=/opt/atmguard
readonly VENV=$PREFIX/venv
readonly STATE_DIR=/var/lib/atmguard
readonly ETC_DIR=/etc/atmguard
readonly CONFIG=$ETC_DIR/atmguard.toml
readonly UNIT_DEST=/etc/systemd/system/$SERVICE.service
readonly DROPIN_DIR=/etc/systemd/system/$SERVICE.service.d
readonly RULE_DEST=/etc/udev/rules.d/99-atmguard-cardreader.rules
readonly MODULES_DEST=/etc/modules-load.d/atmguard.conf
# atmguard's exit status when there is no journal at all (EX_NOINPUT).
readonly EX_NOINPUT=66

dry_run=0
purge=0

say() { printf 'atmguard-uninstall: %s\n' "$*"; }
die() {
    printf 'atmguard-uninstall: ERROR: %s\n' "$*" >&2
    exit 1
}
run() {
    if ((dry_run)); then
        printf 'would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        say "running: $*"
        "$@"
    fi
}

while (($#)); do
    case $1 in
        --dry-run) dry_run=1 ;;
        --purge) purge=1 ;;
        -h | --help)
            sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            echo "usage: $0 [--dry-run] [--purge]" >&2
            exit 2
            ;;
    esac
    shift
done

if ((!dry_run)) && [[ $(id -u) -ne 0 ]]; then
    die "must run as root (sudo $0 $*); --dry-run shows what it would do without root"
fi
((dry_run)) && say "dry run: nothing will be changed"

# outbox_empty: 0 when the journal provably holds nothing unsynced and no dead letter (or there is
# no journal and the state directory is empty); 1 with the reason printed otherwise. Any doubt
# (no atmguard to ask, an unreadable journal) counts as "not empty".
outbox_empty() {
    local out status=0
    if [[ ! -d "$STATE_DIR" ]] || [[ -z $(ls -A "$STATE_DIR") ]]; then
        say "$STATE_DIR is empty or absent"
        return 0
    fi
    if [[ ! -x "$VENV/bin/atmguard" ]]; then
        say "cannot ask atmguard about $STATE_DIR ($VENV/bin/atmguard is gone)"
        return 1
    fi
    out=$("$VENV/bin/atmguard" --config "$CONFIG" outbox --json) || status=$?
    if ((status == EX_NOINPUT)); then
        say "$STATE_DIR holds files but no journal: inspect them by hand"
        return 1
    elif ((status != 0)); then
        say "atmguard outbox failed (exit $status)"
        return 1
    fi
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
left = {k: d[k] for k in ("pending_events", "pending_snapshots", "dead_events", "dead_snapshots")}
if any(left.values()):
    print("atmguard-uninstall: outbox not empty: " + ", ".join(f"{k}={v}" for k, v in left.items()))
    sys.exit(1)
' "$out"
}

refuse_purge() {
    die "--purge refused: $STATE_DIR still holds evidence that is on this ATM only. Sync it" \
        "(sudo -u $SERVICE $VENV/bin/atmguard sync --once; resolve dead letters with" \
        "'atmguard outbox'), or copy $STATE_DIR somewhere safe and remove it by hand. $1"
}

# Asked before anything changes, so a refused purge leaves the ATM exactly as it was.
if ((purge)) && ! outbox_empty; then
    refuse_purge "Nothing was changed."
fi

# --- the service ------------------------------------------------------------------------------------
if [[ -f "$UNIT_DEST" ]]; then
    # stop ejects a card still in the reader (the daemon does that on SIGTERM) before it exits.
    run systemctl disable --now "$SERVICE.service"
else
    say "$UNIT_DEST is not installed"
fi

# Asked again once the daemon has stopped: a customer may have been journaled in between.
if ((purge && !dry_run)) && ! outbox_empty; then
    if [[ -f "$UNIT_DEST" ]]; then
        run systemctl enable --now "$SERVICE.service"
    fi
    refuse_purge "The service was started again; nothing was removed."
fi

for file in "$UNIT_DEST" "$RULE_DEST" "$MODULES_DEST"; do
    if [[ -e "$file" ]]; then
        run rm -f "$file"
    fi
done
if [[ -d "$DROPIN_DIR" ]]; then
    # Site drop-ins (bank server address, extra devices) are configuration: kept unless --purge.
    if ((purge)); then
        run rm -rf "$DROPIN_DIR"
    else
        say "keeping site drop-ins in $DROPIN_DIR"
    fi
fi
if command -v udevadm >/dev/null; then
    run udevadm control --reload
fi
if command -v systemctl >/dev/null; then
    run systemctl daemon-reload
fi
if [[ -e "$PREFIX" ]]; then
    # The venv, the installed models and the docs: all rebuilt by install.sh.
    run rm -rf "$PREFIX"
fi

if ((purge)); then
    for dir in "$STATE_DIR" "$ETC_DIR"; do
        if [[ -e "$dir" ]]; then
            run rm -rf "$dir"
        fi
    done
    if getent passwd "$SERVICE" >/dev/null; then
        run userdel "$SERVICE"
    fi
    if getent group "$SERVICE" >/dev/null; then
        run groupdel "$SERVICE"
    fi
else
    say "kept: $STATE_DIR (evidence journal), $ETC_DIR (config, credentials), user $SERVICE"
fi
if ((dry_run)); then
    say "dry run done, nothing changed"
else
    say "done"
fi
