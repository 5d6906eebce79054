# avalon-mds / avalon-osd: rpm -e never deletes /var/lib/avalon nor the
# avalon user (delete them by hand: rm -rf /var/lib/avalon; userdel avalon).
[ -d /run/systemd/system ] && systemctl daemon-reload >/dev/null 2>&1
exit 0
