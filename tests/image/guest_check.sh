#!/bin/sh
# Runs INSIDE the booted qemu image, as the kernel command line's systemd.run= command that
# tests/image/test_image.py injects (the image itself has no test hook). It is read from the
# test's own drive (label TABLETD-TEST, mounted at /mnt), writes what it finds as
# key=value lines to /mnt/results.txt, and returns; systemd then powers the machine off.
# Every wait is a bounded poll.
set -u
R=/mnt/results.txt
: > "$R"
put() {  # put KEY VALUE: one line, newlines folded
    v="$(printf '%s' "$2" | tr '\n' '|')"
    printf '%s=%s\n' "$1" "$v" >> "$R"
    echo "IMAGETEST $1=$v" > /dev/console
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
show() { systemctl show -p "$1" --value tabletd.service; }

put uptime_check_start "$(uptime_s)"
# -- tabletd active (Type=notify: READY=1 arrived), bounded at 180 s of guest time
i=0
while [ $i -lt 360 ]; do
    state="$(systemctl is-active tabletd.service)"
    [ "$state" = active ] || [ "$state" = failed ] && break
    sleep 0.5; i=$((i + 1))
done
put active "$(systemctl is-active tabletd.service)"
put uptime_active "$(uptime_s)"
put enabled "$(systemctl is-enabled tabletd.service)"
put status_text "$(show StatusText)"
put n_restarts "$(show NRestarts)"
pid="$(show MainPID)"
put main_user "$(stat -c %U "/proc/$pid" 2>&1)"
put cmdline "$(cat /proc/cmdline)"

# -- file systems
put root_options "$(findmnt -no OPTIONS /)"
put root_source "$(findmnt -no SOURCE /)"
put root_write "$(touch /.rw-probe 2>&1 && echo WRITABLE)"
data="$(findmnt -no SOURCE /var/lib/tabletd)"
put data_fstype "$(findmnt -no FSTYPE /var/lib/tabletd)"
put data_label "$(blkid -s LABEL -o value "$data" 2>&1)"
put data_owner_mode "$(stat -c '%U %a' /var/lib/tabletd)"
put data_files "$(ls /var/lib/tabletd)"
boot="$(findmnt -no SOURCE /boot/firmware)"
put boot_fstype "$(findmnt -no FSTYPE /boot/firmware)"
put boot_label "$(blkid -s LABEL -o value "$boot" 2>&1)"
put boot_files "$(ls /boot/firmware /boot/firmware/slot-a)"
for d in /tmp /var/tmp /var/log /var/lib/systemd; do
    put "fstype_$d" "$(findmnt -no FSTYPE "$d")"
done
put partitions "$(lsblk -rno NAME,LABEL,SIZE,MOUNTPOINT 2>&1)"

# -- the rest of the image's promises
put tabletd_user "$(getent passwd tabletd)"
put tabletd_groups "$(id -nG tabletd)"
put usb_storage_dry_run "$(modprobe -n -v usb_storage 2>&1)"
put usb_storage_load "$(modprobe usb_storage 2>&1; echo "exit $?")"
put sshd "$(test -e /usr/sbin/sshd && echo present || echo absent)"
put devserver "$(/opt/tabletd/bin/python -c 'import tabletd.devserver' 2>&1 | tail -1; ls /opt/tabletd/bin/tabletd-devserver 2>&1)"
put timezone "$(readlink /etc/localtime) $(date +%Z)"
put getty_target "$(systemctl is-enabled getty.target 2>&1)"
put gettys "$(systemctl list-units --no-legend --plain 'getty@*' 'serial-getty@*' | wc -l)"
put timesyncd "$(systemctl is-enabled systemd-timesyncd.service) $(systemctl is-active systemd-timesyncd.service)"
put ntp "$(systemd-analyze cat-config systemd/timesyncd.conf | grep -E '^(NTP|FallbackNTP)=')"
put journal_dirs "$(ls -d /run/log/journal /var/log/journal 2>&1)"
put journald_limits "$(systemd-analyze cat-config systemd/journald.conf | grep -E '^(Storage|RuntimeMaxUse)=')"
# -- polkit: tabletd may power the tablet off (critical battery) and do nothing else
rules=/etc/polkit-1/rules.d/50-tabletd-poweroff.rules
if [ -f "$rules" ]; then
    put poweroff_allowed "$(pkcheck --action-id org.freedesktop.login1.power-off --process "$pid" 2>&1; echo "exit $?")"
    put reboot_allowed "$(pkcheck --action-id org.freedesktop.login1.reboot --process "$pid" 2>&1; echo "exit $?")"
else
    put poweroff_allowed "no $rules"
fi
put check_config "$(/opt/tabletd/bin/tabletd check-config /etc/tabletd/tabletd.toml 2>&1; echo "exit $?")"

# -- systemd-analyze security on the unit as loaded by this systemd
put security "$(SYSTEMD_COLORS=0 systemd-analyze security --no-pager tabletd.service 2>&1 | grep 'Overall exposure')"

# -- how each earlier run of the daemon ended, if any did (before the SIGSTOP below)
put pre_failures "$(journalctl -u tabletd.service -o cat --no-pager | grep 'Failed with result')"

# -- a hung daemon: SIGSTOP; WatchdogSec= kills it, Restart= brings it back
before="$(show NRestarts)"
t0="$(uptime_s)"
kill -STOP "$pid"
i=0
while [ $i -lt 240 ]; do
    now_pid="$(show MainPID)"
    if [ "$(show NRestarts)" -gt "$before" ] && [ "$now_pid" != "$pid" ] && [ "$now_pid" != 0 ] \
        && [ "$(systemctl is-active tabletd.service)" = active ]; then
        break
    fi
    sleep 0.5; i=$((i + 1))
done
put watchdog_restart_s "$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN{printf "%.1f", b-a}')"
put watchdog_n_restarts "$before $(show NRestarts)"
put watchdog_pids "$pid $(show MainPID)"
put watchdog_active "$(systemctl is-active tabletd.service)"
put watchdog_journal "$(journalctl -u tabletd.service -o cat --no-pager | grep -c 'Watchdog timeout')"
put failed_units "$(systemctl list-units --failed --no-legend --plain | cut -d' ' -f1)"

journalctl -b -o short-monotonic --no-pager > /mnt/journal.txt 2>&1
put uptime_check_end "$(uptime_s)"
echo done >> "$R"
sync
cd /
# This shell still reads its script from /mnt: detach it now, it goes when the shell ends.
umount -l /mnt
exit 0
