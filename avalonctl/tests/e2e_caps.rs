//! Client capabilities enforced by the MDS, through real mounts: a key
//! confined to /projects/x sees only that subtree (and the MDS refuses
//! its requests for inodes outside it, by number); a read-only key gets
//! EROFS for each kind of change; root_squash makes root's creates owned
//! by nobody and keeps root out of another user's 0600 file; a session id
//! is usable only by the identity that opened it; `auth rm` cuts a
//! mounted client off within a lease.

mod common;

use avalon_proto::errno::errno_of;
use avalon_proto::pb::{self, meta_client::MetaClient};
use avalon_proto::tls::{ClientTls, Dial};
use avalonctl::keys;
use common::{admin_ctl, refused_errno, SecondMount, TestCluster};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

#[test]
fn capabilities_confine_limit_squash_and_revoke() {
    let mut t = TestCluster::start(1, 3);
    let dir = std::fs::canonicalize(t.dir.path()).expect("dir");
    let kd = avalonctl::local_cluster::keys_dir(&dir);
    let kds = kd.to_str().expect("utf8");
    let mds = t.c().layout.mds_addrs().join(",");
    let root = t.mnt();

    // Set up as the unlimited mount: a project, a file outside it, and a
    // 0600 file of another user inside it.
    std::fs::create_dir_all(root.join("projects/x")).expect("mkdir");
    // Squashed root is an ordinary user to the MDS: it may create here.
    std::fs::set_permissions(
        root.join("projects/x"),
        std::fs::Permissions::from_mode(0o777),
    )
    .expect("chmod");
    std::fs::write(root.join("projects/x/in"), b"in").expect("write");
    std::fs::write(root.join("secret"), b"s").expect("write");
    let private = root.join("projects/x/private");
    std::fs::write(&private, b"p").expect("write");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(&private, Some(1000), Some(1000)).expect("chown");
    let secret_ino = std::fs::metadata(root.join("secret")).expect("stat").ino();

    admin_ctl(
        &kd,
        &[
            "auth",
            "add",
            "client.x",
            "--dir",
            kds,
            "--mds",
            &mds,
            "--path",
            "/projects/x",
            "--root-squash",
        ],
    );
    admin_ctl(
        &kd,
        &[
            "auth",
            "add",
            "client.ro",
            "--dir",
            kds,
            "--mds",
            &mds,
            "--read-only",
        ],
    );
    let opt = |n: &str| format!("name={n},keyfile={}", keys::keyfile(&kd, n).display());

    // Confined and squashed.
    let x = SecondMount::with_options(t.c(), dir.join("mnt-x"), &opt("client.x"));
    let mut names: Vec<_> = std::fs::read_dir(&x.path)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    names.sort();
    assert_eq!(names, ["in", "private"], "the mount's root is /projects/x");
    assert_eq!(std::fs::read(x.path.join("in")).expect("read"), b"in");
    std::fs::write(x.path.join("by-root"), b"r").expect("create");
    let m = std::fs::metadata(root.join("projects/x/by-root")).expect("stat");
    assert_eq!(
        (m.uid(), m.gid()),
        (65534, 65534),
        "root's create is squashed"
    );
    assert_eq!(
        refused_errno(std::fs::read(x.path.join("private"))),
        libc::EACCES
    );

    // The MDS itself refuses inodes outside the subtree, by number, and a
    // session of another identity.
    let rt = common::rt();
    let t10 = Duration::from_secs(10);
    let tls = |n: &str| ClientTls::from_keyfile(&keys::keyfile(&kd, n)).expect("key");
    let leader = t.c().layout.mds_addrs()[0].clone();
    let (outside, stolen) = rt.block_on(async {
        let ch = tls("client.x")
            .channel(&leader, Dial::Mds, t10)
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
        let hdr = Some(pb::RequestHeader {
            session_id: reg.session_id,
            ..Default::default()
        });
        let outside = c
            .get_attr(pb::GetAttrRequest {
                header: hdr.clone(),
                ino: secret_ino,
            })
            .await
            .expect_err("inode outside the subtree");
        let ch = tls("client.ro")
            .channel(&leader, Dial::Mds, t10)
            .expect("ch");
        let stolen = MetaClient::new(ch)
            .session(pb::SessionRequest { header: hdr })
            .await
            .map(|_| ())
            .expect_err("another identity's session");
        (outside, stolen)
    });
    assert_eq!(errno_of(&outside), libc::EACCES);
    assert_eq!(stolen.code(), tonic::Code::PermissionDenied);

    // Read-only: reads work, every kind of change is EROFS.
    let ro = SecondMount::with_options(t.c(), dir.join("mnt-ro"), &opt("client.ro"));
    let p = |s: &str| ro.path.join(s);
    assert_eq!(std::fs::read(p("secret")).expect("read"), b"s");
    let erofs = [
        ("create", refused_errno(std::fs::write(p("new"), b"n"))),
        (
            "write open",
            refused_errno(std::fs::OpenOptions::new().write(true).open(p("secret"))),
        ),
        ("mkdir", refused_errno(std::fs::create_dir(p("d")))),
        ("unlink", refused_errno(std::fs::remove_file(p("secret")))),
        (
            "rename",
            refused_errno(std::fs::rename(p("secret"), p("s2"))),
        ),
        (
            "link",
            refused_errno(std::fs::hard_link(p("secret"), p("s3"))),
        ),
        (
            "symlink",
            refused_errno(std::os::unix::fs::symlink("secret", p("s4"))),
        ),
        (
            "chmod",
            refused_errno(std::fs::set_permissions(
                p("secret"),
                std::fs::Permissions::from_mode(0o644),
            )),
        ),
        ("rmdir", refused_errno(std::fs::remove_dir(p("projects/x")))),
    ];
    for (what, e) in erofs {
        assert_eq!(e, libc::EROFS, "{what}");
    }
    let path =
        std::ffi::CString::new(p("secret").into_os_string().into_encoded_bytes()).expect("path");
    // SAFETY: NUL-terminated path and name, a valid 1-byte value.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"user.a".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(rc, -1, "setxattr");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EROFS),
        "setxattr"
    );
    drop(ro);

    // Revocation: the mounted client is cut off within a lease, and a new
    // mount with the key fails.
    admin_ctl(
        &kd,
        &["auth", "rm", "client.x", "--dir", kds, "--mds", &mds],
    );
    let mut i = 0;
    let cut = common::wait_until(Duration::from_secs(60), || {
        i += 1;
        std::fs::write(x.path.join(format!("after-rm-{i}")), b"z").is_err()
    });
    assert!(cut, "the revoked client still changes the namespace");
    let again = dir.join("mnt-x2");
    std::fs::create_dir_all(&again).expect("mkdir");
    let out = Command::new(avalonctl::local_cluster::default_bin_dir().join("avalon-fuse"))
        .arg(t.c().layout.source())
        .arg(&again)
        .arg("-o")
        .arg(format!("connect_timeout=10,{}", opt("client.x")))
        .output()
        .expect("run avalon-fuse");
    assert!(!out.status.success(), "a revoked key mounted");
    assert!(!avalonctl::local_cluster::is_mounted(&again));
}
