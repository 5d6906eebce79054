//! The MDS's on-disk and wire decoders (Raft log entries, commands,
//! snapshots of the state) given random bytes, or real encodings with
//! bytes changed or cut: an error or a value, never a panic or a huge
//! allocation.

use avalon_mds::command::{MetaCommand, Op};
use avalon_mds::namespace::State;
use avalon_mds::raft_store::TypeConfig;
use openraft::Entry;
use proptest::prelude::*;

fn samples() -> Vec<Vec<u8>> {
    let cmd = MetaCommand {
        now_ns: 1,
        session_id: 7,
        request_id: 9,
        op: Op::RegisterClientWithId {
            hostname: "h".into(),
            mountpoint: b"/mnt".to_vec(),
            pid: 3,
            subdir: b"/a/b".to_vec(),
            identity: Some("client.x".into()),
            session_id: 0xabcdef,
        },
    };
    let entry: Entry<TypeConfig> = Entry {
        log_id: Default::default(),
        payload: openraft::EntryPayload::Normal(cmd.clone()),
    };
    vec![
        postcard::to_allocvec(&cmd).expect("encode"),
        postcard::to_allocvec(&entry).expect("encode"),
        postcard::to_allocvec(&State::new()).expect("encode"),
    ]
}

fn decode_all(b: &[u8]) {
    let _ = postcard::from_bytes::<MetaCommand>(b);
    let _ = postcard::from_bytes::<Entry<TypeConfig>>(b);
    let _ = postcard::from_bytes::<State>(b);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn damaged_encodings_never_panic(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in 0usize..16,
    ) {
        let mut b = samples().swap_remove(which);
        for (i, v) in edits {
            let n = b.len();
            b[i % n] = v;
        }
        b.truncate(b.len().saturating_sub(cut));
        decode_all(&b);
    }
}
