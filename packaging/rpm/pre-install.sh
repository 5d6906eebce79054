# avalon-mds / avalon-osd: the system user the units run as.
getent group avalon >/dev/null || groupadd -r avalon
getent passwd avalon >/dev/null || useradd -r -g avalon -d /var/lib/avalon -M \
    -s /sbin/nologin -c "Avalon storage daemons" avalon
exit 0
