//! Permissions checked by the MDS itself (issue 19), through real mounts
//! and through the gRPC API directly: an unprivileged user gets EACCES at
//! a mount and reads through a supplementary group (which the MDS asks
//! the client for); a root_squash mount's root is an ordinary user (its
//! creates are owned by nobody, it cannot read, chmod or remove another
//! user's files); and a request that bypasses the kernel's check, made
//! with a client key claiming a uid without rights, is refused with
//! nothing changed, while the same call with the rights passes.

mod common;

use avalon_proto::errno::errno_of;
use avalon_proto::pb::{self, meta_client::MetaClient};
use avalon_proto::tls::{ClientTls, Dial};
use avalonctl::keys;
use common::{admin_ctl, refused_errno, SecondMount, TestCluster};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `args` as uid/gid `id` with supplementary `groups`; its stderr if
/// it failed.
fn as_user(id: u32, groups: &[u32], args: &[&str]) -> Result<(), String> {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let out = Command::new("setpriv")
        .args([format!("--reuid={id}"), format!("--regid={id}"), groups])
        .arg("--")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("setpriv");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown");
}

#[test]
fn the_mds_checks_the_callers_permissions() {
    let mut t = TestCluster::start(1, 3);
    let dir = std::fs::canonicalize(t.dir.path()).expect("dir");
    // Other users must reach the mounts below it.
    chmod(&dir, 0o755);
    let kd = avalonctl::local_cluster::keys_dir(&dir);
    let kds = kd.to_str().expect("utf8");
    let mds = t.c().layout.mds_addrs().join(",");
    let root = t.mnt();
    let s = |n: &str| root.join(n);

    // As the unlimited mount's root: a home of user 1000 (0755) with a
    // private file, a group-readable one (group 3000) and a public one.
    std::fs::create_dir(s("home")).expect("mkdir");
    chown(&s("home"), 1000, 1000);
    for (name, mode, gid) in [
        ("private", 0o600, 1000),
        ("grp", 0o640, 3000),
        ("public", 0o644, 1000),
    ] {
        let p = s(&format!("home/{name}"));
        std::fs::write(&p, name).expect("write");
        chown(&p, 1000, gid);
        chmod(&p, mode);
    }
    std::fs::create_dir(s("tmp")).expect("mkdir");
    chmod(&s("tmp"), 0o1777);
    let p = |n: &str| s(n).to_str().expect("utf8").to_string();

    // An unprivileged user through the mount.
    let e = as_user(2000, &[], &["cat", &p("home/private")]).expect_err("read 0600");
    assert!(e.contains("Permission denied"), "{e}");
    as_user(2000, &[], &["cat", &p("home/public")]).expect("read 0644");
    as_user(2000, &[], &["cat", &p("home/grp")]).expect_err("not in the group");
    // Through a supplementary group: the kernel lets it through, the MDS
    // asks the client for the caller's groups and agrees.
    as_user(2000, &[3000], &["cat", &p("home/grp")]).expect("read via group 3000");
    as_user(2000, &[], &["touch", &p("home/new")]).expect_err("create in 0755 of 1000");
    as_user(2000, &[], &["touch", &p("tmp/by2000")]).expect("create in /tmp");
    let m = std::fs::metadata(s("tmp/by2000")).expect("stat");
    assert_eq!((m.uid(), m.gid()), (2000, 2000));
    as_user(3000, &[], &["rm", "-f", &p("tmp/by2000")]).expect_err("sticky");
    assert!(s("tmp/by2000").exists());

    // A root_squash key: root is nobody.
    admin_ctl(
        &kd,
        &[
            "auth",
            "add",
            "client.sq",
            "--dir",
            kds,
            "--mds",
            &mds,
            "--root-squash",
        ],
    );
    let opt = format!(
        "name=client.sq,keyfile={}",
        keys::keyfile(&kd, "client.sq").display()
    );
    let sq = SecondMount::with_options(t.c(), dir.join("mnt-sq"), &opt);
    let q = |n: &str| sq.path.join(n);
    assert_eq!(
        refused_errno(std::fs::read(q("home/private"))),
        libc::EACCES
    );
    assert_eq!(std::fs::read(q("home/public")).expect("read"), b"public");
    assert_eq!(
        refused_errno(std::fs::write(q("home/by-root"), b"r")),
        libc::EACCES
    );
    assert_eq!(
        refused_errno(std::fs::remove_file(q("home/public"))),
        libc::EACCES
    );
    let refused =
        std::fs::set_permissions(q("home/public"), std::fs::Permissions::from_mode(0o666));
    assert_eq!(
        refused_errno(refused),
        libc::EPERM,
        "chmod of another's file"
    );
    assert_eq!(
        refused_errno(std::os::unix::fs::chown(q("home/public"), Some(0), None)),
        libc::EPERM
    );
    std::fs::write(q("tmp/by-root"), b"r").expect("create in /tmp");
    let m = std::fs::metadata(s("tmp/by-root")).expect("stat");
    assert_eq!((m.uid(), m.gid()), (65534, 65534), "squashed create");
    let m = std::fs::metadata(s("home/public")).expect("stat");
    assert_eq!((m.mode() & 0o7777, m.uid()), (0o644, 1000), "unchanged");
    drop(sq);

    // Bypassing the kernel: the gRPC API with the squashed key (and with
    // the unlimited mount's key), claiming a caller without rights.
    let ino = |n: &str| std::fs::metadata(s(n)).expect("stat").ino();
    let (home, private, grp) = (ino("home"), ino("home/private"), ino("home/grp"));
    let rt = common::rt();
    let t10 = Duration::from_secs(10);
    let leader = t.c().layout.mds_addrs()[0].clone();
    let tls = |n: &str| ClientTls::from_keyfile(&keys::keyfile(&kd, n)).expect("key");
    for key in ["client.sq", avalonctl::local_cluster::MOUNT_IDENTITY] {
        let tls = tls(key);
        rt.block_on(async {
            let ch = tls.channel(&leader, Dial::Mds, t10).expect("ch");
            let mut c = MetaClient::new(ch);
            let reg = c
                .register_client(pb::RegisterClientRequest {
                    hostname: "test".into(),
                    subdir: b"/".to_vec().into(),
                    ..Default::default()
                })
                .await
                .expect("register")
                .into_inner();
            let as_uid = |uid: u32, gid: u32| {
                Some(pb::RequestHeader {
                    session_id: reg.session_id,
                    caller_uid: uid,
                    caller_gid: gid,
                    has_caller: true,
                    ..Default::default()
                })
            };
            let open = |hdr, ino, flags: i32| pb::OpenRequest {
                header: hdr,
                ino,
                flags: flags as u32,
                ..Default::default()
            };
            for (uid, what) in [(2000, "another user"), (0, "root")] {
                let r = c
                    .open(open(as_uid(uid, uid), private, libc::O_RDONLY))
                    .await;
                if uid == 0 && key != "client.sq" {
                    r.expect("unsquashed root opens");
                    continue;
                }
                let e = r.expect_err("open of a 0600 file");
                assert_eq!(e.code(), tonic::Code::PermissionDenied, "{key} as {what}");
                assert_eq!(errno_of(&e), libc::EACCES, "{key} as {what}");
            }
            let e = c
                .unlink(pb::UnlinkRequest {
                    header: as_uid(2000, 2000),
                    parent: home,
                    name: "public".into(),
                })
                .await
                .expect_err("unlink in another's 0755 directory");
            assert_eq!(errno_of(&e), libc::EACCES, "{key}");
            let e = c
                .set_attr(pb::SetAttrRequest {
                    header: as_uid(2000, 2000),
                    ino: private,
                    mode: Some(0o666),
                    ..Default::default()
                })
                .await
                .expect_err("chmod of another's file");
            assert_eq!(errno_of(&e), libc::EPERM, "{key}");
            // Group access: decided only with the groups, which the MDS
            // asks for; with them it passes.
            let e = c
                .open(open(as_uid(2000, 2000), grp, libc::O_RDONLY))
                .await
                .expect_err("groups unknown");
            assert!(avalon_proto::caller::asks_groups(&e), "{key}: {e:?}");
            let mut req = tonic::Request::new(open(as_uid(2000, 2000), grp, libc::O_RDONLY));
            req.metadata_mut().insert(
                avalon_proto::caller::GROUPS_KEY,
                avalon_proto::caller::encode(&[3000])
                    .parse()
                    .expect("value"),
            );
            c.open(req).await.expect("open through group 3000");
            // The owner passes.
            c.open(open(as_uid(1000, 1000), private, libc::O_RDONLY))
                .await
                .expect("the owner opens");
        });
    }
    // Nothing changed.
    let m = std::fs::metadata(s("home/private")).expect("stat");
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert_eq!(std::fs::read(s("home/public")).expect("read"), b"public");
    assert_eq!(std::fs::read(s("home/private")).expect("read"), b"private");
}

/// Registers a session of `key` at `leader` (at the root its key allows)
/// and runs `f` with a client of it and the session id.
fn with_session<F, Fut>(kd: &Path, key: &str, leader: &str, f: F)
where
    F: FnOnce(MetaClient<tonic::transport::Channel>, u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let tls = ClientTls::from_keyfile(&keys::keyfile(kd, key)).expect("key");
    common::rt().block_on(async {
        let ch = tls
            .channel(leader, Dial::Mds, Duration::from_secs(10))
            .expect("ch");
        let mut c = MetaClient::new(ch);
        let reg = c
            .register_client(pb::RegisterClientRequest {
                hostname: "test".into(),
                subdir: b"/".to_vec().into(),
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner();
        f(c, reg.session_id).await
    });
}

/// A header of session `sid` naming caller `uid` (gid the same), or none.
fn hdr(sid: u64, uid: Option<u32>) -> Option<pb::RequestHeader> {
    Some(pb::RequestHeader {
        session_id: sid,
        caller_uid: uid.unwrap_or(0),
        caller_gid: uid.unwrap_or(0),
        has_caller: uid.is_some(),
        ..Default::default()
    })
}

#[test]
fn limited_keys_gain_nothing_by_naming_no_caller_and_chunk_caps_follow_permissions() {
    let mut t = TestCluster::start(1, 3);
    let dir = std::fs::canonicalize(t.dir.path()).expect("dir");
    let kd = avalonctl::local_cluster::keys_dir(&dir);
    let kds = kd.to_str().expect("utf8");
    let mds = t.c().layout.mds_addrs().join(",");
    let leader = t.c().layout.mds_addrs()[0].clone();
    let root = t.mnt();
    let s = |n: &str| root.join(n);
    std::fs::create_dir(s("home")).expect("mkdir");
    chown(&s("home"), 1000, 1000);
    for (name, mode) in [("private", 0o600), ("public", 0o644), ("later", 0o644)] {
        std::fs::write(s(&format!("home/{name}")), name).expect("write");
        chown(&s(&format!("home/{name}")), 1000, 1000);
        chmod(&s(&format!("home/{name}")), mode);
    }
    // The root mount's changes (made under its write delegations) reach
    // the MDS before other sessions look at the files.
    for n in ["home/private", "home/public", "home/later", "home"] {
        std::fs::File::open(s(n))
            .and_then(|f| f.sync_all())
            .expect("fsync");
    }
    let ino = |n: &str| std::fs::metadata(s(n)).expect("stat").ino();
    let (home, private, public, later) = (
        ino("home"),
        ino("home/private"),
        ino("home/public"),
        ino("home/later"),
    );
    // Limited by root_squash only, and by a subtree only (whose callers
    // may name uid 0: leaving the caller out must not be worth more).
    admin_ctl(
        &kd,
        &[
            "auth",
            "add",
            "client.sq",
            "--dir",
            kds,
            "--mds",
            &mds,
            "--root-squash",
        ],
    );
    admin_ctl(
        &kd,
        &[
            "auth",
            "add",
            "client.sub",
            "--dir",
            kds,
            "--mds",
            &mds,
            "--path",
            "/home",
        ],
    );
    let open = |hdr, ino, flags: i32| pb::OpenRequest {
        header: hdr,
        ino,
        flags: flags as u32,
        ..Default::default()
    };
    for key in ["client.sq", "client.sub"] {
        // (A confined key's session is rooted at its subtree, /home.)
        with_session(&kd, key, &leader, |mut c, sid| async move {
            // No caller named (an older client's form), and no header.
            for h in [hdr(sid, None), None] {
                let e = c
                    .open(open(h.clone(), private, libc::O_RDONLY))
                    .await
                    .expect_err("open of another's 0600 file");
                assert_eq!(e.code(), tonic::Code::PermissionDenied, "{key} {h:?}");
                assert_eq!(errno_of(&e), libc::EACCES, "{key} {h:?}");
            }
            let e = c
                .set_attr(pb::SetAttrRequest {
                    header: hdr(sid, None),
                    ino: private,
                    mode: Some(0o666),
                    ..Default::default()
                })
                .await
                .expect_err("chmod of another's file");
            assert_eq!(errno_of(&e), libc::EPERM, "{key}");
            let e = c
                .unlink(pb::UnlinkRequest {
                    header: hdr(sid, None),
                    parent: home,
                    name: "public".into(),
                })
                .await
                .expect_err("unlink in another's 0755 directory");
            assert_eq!(errno_of(&e), libc::EACCES, "{key}");
            let e = c
                .get_chunk_cap(pb::ChunkCapRequest {
                    header: hdr(sid, None),
                    ino: private,
                    write: false,
                })
                .await
                .expect_err("a read capability for another's 0600 file");
            assert_eq!(errno_of(&e), libc::EACCES, "{key}");
            // What nobody may do passes without a caller too.
            c.open(open(hdr(sid, None), public, libc::O_RDONLY))
                .await
                .expect("open of a 0644 file");
        });
    }

    // Chunk capabilities: only with the permission, for any key.
    for key in ["client.sq", avalonctl::local_cluster::MOUNT_IDENTITY] {
        with_session(&kd, key, &leader, |mut c, sid| async move {
            let cap = |uid: u32, ino: u64, write: bool| pb::ChunkCapRequest {
                header: hdr(sid, Some(uid)),
                ino,
                write,
            };
            let e = c
                .get_chunk_cap(cap(2000, public, true))
                .await
                .expect_err("a write capability for a file 2000 may only read");
            assert_eq!(errno_of(&e), libc::EACCES, "{key}");
            let e = c
                .get_chunk_cap(cap(2000, private, false))
                .await
                .expect_err("a read capability for another's 0600 file");
            assert_eq!(errno_of(&e), libc::EACCES, "{key}");
            let r = c
                .get_chunk_cap(cap(2000, public, false))
                .await
                .expect("a read capability for a 0644 file")
                .into_inner();
            assert!(!r.cap.is_empty(), "{key}: signed");
            c.get_chunk_cap(cap(1000, private, true))
                .await
                .expect("the owner's write capability");
        });
    }
    // A file the session has open for writing gets its write capability
    // whoever the caller (the open was checked; an open file keeps its
    // rights): the renewals of a write-back never fail.
    with_session(&kd, "client.sq", &leader, |mut c, sid| async move {
        c.open(open(hdr(sid, Some(1000)), later, libc::O_WRONLY))
            .await
            .expect("the owner opens for writing");
        for uid in [Some(2000), None] {
            c.get_chunk_cap(pb::ChunkCapRequest {
                header: hdr(sid, uid),
                ino: later,
                write: true,
            })
            .await
            .expect("renewal for the open file");
        }
    });
    // Nothing changed.
    let m = std::fs::metadata(s("home/private")).expect("stat");
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert_eq!(std::fs::read(s("home/private")).expect("read"), b"private");
    assert_eq!(std::fs::read(s("home/public")).expect("read"), b"public");
}

#[test]
fn a_mapped_key_sees_its_own_ids_and_stores_the_clusters() {
    let mut t = TestCluster::start(1, 3);
    let dir = std::fs::canonicalize(t.dir.path()).expect("dir");
    chmod(&dir, 0o755);
    let kd = avalonctl::local_cluster::keys_dir(&dir);
    let kds = kd.to_str().expect("utf8");
    let mds = t.c().layout.mds_addrs().join(",");
    let root = t.mnt();
    let s = |n: &str| root.join(n);
    std::fs::create_dir(s("shared")).expect("mkdir");
    chmod(&s("shared"), 0o777);
    // Client uids/gids 1000..1009 are 5000..5009 in the cluster; root is
    // root; everything else is the squash ids (nobody).
    admin_ctl(
        &kd,
        &[
            "auth",
            "add",
            "client.map",
            "--dir",
            kds,
            "--mds",
            &mds,
            "--map-uid",
            "0:0",
            "--map-uid",
            "1000:5000:10",
            "--map-gid",
            "0:0",
            "--map-gid",
            "1000:5000:10",
        ],
    );
    let ls = common::run(
        Command::new(avalonctl::local_cluster::default_bin_dir().join("avalonctl"))
            .arg("--keyfile")
            .arg(keys::keyfile(&kd, keys::ADMIN))
            .args(["auth", "ls", "--dir", kds, "--mds", &mds]),
    );
    assert!(
        ls.lines().any(|l| l.starts_with("client.map")
            && l.contains("map_uid=0:0:1,1000:5000:10")
            && l.contains("map_gid=0:0:1,1000:5000:10")),
        "auth ls shows the mapping: {ls}"
    );
    let opt = format!(
        "name=client.map,keyfile={}",
        keys::keyfile(&kd, "client.map").display()
    );
    let m = SecondMount::with_options(t.c(), dir.join("mnt-map"), &opt);
    let q = |n: &str| m.path.join(n);
    let p = |n: &str| q(n).to_str().expect("utf8").to_string();
    let ids = |path: &Path| {
        let st = std::fs::metadata(path).expect("stat");
        (st.uid(), st.gid())
    };

    // A create by client uid 1000: cluster uid 5000, seen as 1000.
    as_user(1000, &[], &["touch", &p("shared/by1000")]).expect("create as 1000");
    assert_eq!(ids(&s("shared/by1000")), (5000, 5000), "stored mapped");
    assert_eq!(ids(&q("shared/by1000")), (1000, 1000), "seen unmapped");
    // The listing (readdirplus) says so too.
    let listed = common::run(Command::new("ls").arg("-ln").arg(q("shared")));
    assert!(
        listed
            .lines()
            .any(|l| l.contains(" 1000 1000 ") && l.ends_with("by1000")),
        "{listed}"
    );
    // chown to client ids lands as the cluster's.
    std::os::unix::fs::chown(q("shared/by1000"), Some(1001), Some(1002)).expect("chown");
    assert_eq!(ids(&s("shared/by1000")), (5001, 5002));
    assert_eq!(ids(&q("shared/by1000")), (1001, 1002));
    // The caller is mapped for the MDS's check: 1001 (5001) owns it.
    as_user(1001, &[], &["chmod", "600", &p("shared/by1000")]).expect("owner chmods");
    // ACL entries name client ids on the mount, cluster ids inside.
    let setfacl = Command::new("setfacl")
        .args(["-m", "u:1003:r"])
        .arg(q("shared/by1000"))
        .status()
        .expect("setfacl");
    assert!(setfacl.success());
    let acl = |path: &Path| common::run(Command::new("getfacl").arg("-n").arg(path));
    assert!(
        acl(&s("shared/by1000")).contains("user:5003:r--"),
        "{}",
        acl(&s("shared/by1000"))
    );
    assert!(
        acl(&q("shared/by1000")).contains("user:1003:r--"),
        "{}",
        acl(&q("shared/by1000"))
    );
    // An unmapped client uid acts as the squash uid (a create, not touch:
    // the new file is not 2000's to set times on).
    let create = format!("echo x > {}", p("shared/by2000"));
    as_user(2000, &[], &["sh", "-c", &create]).expect("create as 2000");
    assert_eq!(ids(&s("shared/by2000")), (65534, 65534));
    // A cluster id outside the mapping shows as the squash id.
    std::fs::write(s("shared/by7"), b"7").expect("write");
    chown(&s("shared/by7"), 7, 7);
    assert_eq!(ids(&q("shared/by7")), (65534, 65534));
    drop(m);
}
