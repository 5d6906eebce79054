# avalon-mds / avalon-osd: the state directory; never touches data.
[ -d /var/lib/avalon ] || install -d -o avalon -g avalon -m 0750 /var/lib/avalon
[ -d /run/systemd/system ] && systemctl daemon-reload >/dev/null 2>&1
exit 0
