use super::*;
use proptest::prelude::*;

fn vol() -> VolumeId {
    "vol-0123456789abcdef0".parse().unwrap()
}

fn all_requests() -> Vec<Request> {
    let v = vol();
    vec![
        Request::CreateVolume {
            volume: v.clone(),
            size: 1 << 30,
            hydrating: true,
        },
        Request::DeleteVolume { volume: v.clone() },
        Request::StatVolume { volume: v.clone() },
        Request::Read {
            volume: v.clone(),
            offset: 4096,
            len: 8192,
        },
        Request::Write {
            volume: v.clone(),
            offset: 8192,
            fua: true,
            data: Bytes::from(vec![7u8; 4096]),
        },
        Request::Flush { volume: v.clone() },
        Request::WriteIfUnwritten {
            volume: v.clone(),
            chunk: 3,
            data: Bytes::from(vec![1u8; 100]),
        },
        Request::ChunkState {
            volume: v.clone(),
            chunk: 9,
        },
        Request::Pause { volume: v.clone() },
        Request::Mark {
            volume: v.clone(),
            id: 0,
        },
        Request::Resume { volume: v.clone() },
        Request::MarkResume {
            volume: v.clone(),
            id: 99,
        },
        Request::ChunkVersions {
            volume: v.clone(),
            mark: 0,
            from: 3,
            limit: 10,
        },
        Request::ResetChunks {
            volume: v.clone(),
            chunks: vec![1, 7, 9],
        },
        Request::ChunkDigest {
            volume: v.clone(),
            chunk: 4,
        },
        Request::AdoptChunk {
            volume: v.clone(),
            chunk: 5,
            digest: [0xab; 32],
            info: ChunkInfo {
                hydrated: false,
                user_written: 1,
                generation: 3,
                last_epoch: 1,
            },
        },
        Request::PutChunk {
            volume: v.clone(),
            chunk: 2,
            expect: u64::MAX,
            info: ChunkInfo {
                hydrated: true,
                user_written: 3,
                generation: 8,
                last_epoch: 2,
            },
            data: Bytes::from(vec![4u8; 64]),
        },
        Request::ReadMark {
            volume: v.clone(),
            mark: 2,
            chunk: 5,
        },
        Request::Authorize {
            volume: None,
            rights: rights::ALL,
            holder: "control-plane".into(),
            token: "1767225600.00ff".into(),
        },
        Request::Revoke {
            volume: v.clone(),
            holder: "host-local".into(),
        },
        Request::Authorize {
            volume: Some(v.clone()),
            rights: rights::READ | rights::WRITE,
            holder: "host-local".into(),
            token: "1767225600.00ff".into(),
        },
        Request::ListChangedChunks {
            volume: v.clone(),
            base: 1,
            target: 0,
        },
        Request::ReleaseMark {
            volume: v.clone(),
            mark: 2,
        },
        Request::UnhydratedChunks {
            volume: v,
            from: 4,
            limit: 100,
        },
    ]
}

#[test]
fn requests_round_trip_and_truncations_fail() {
    for (i, req) in all_requests().into_iter().enumerate() {
        let frame = req.encode(i as u64);
        let body = &frame[4..];
        assert_eq!(
            u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
            body.len()
        );
        assert_eq!(Request::decode(body), (Some(i as u64), Ok(req.clone())));
        assert_eq!(
            Request::decode_bytes(&frame.slice(4..)),
            (Some(i as u64), Ok(req.clone()))
        );
        let (head, payload) = req.encode_parts(i as u64);
        assert_eq!(
            [&head[..], payload.as_deref().unwrap_or_default()].concat(),
            frame.to_vec()
        );
        for cut in 0..body.len() {
            assert!(
                Request::decode(&body[..cut]).1.is_err(),
                "{req:?} cut at {cut}"
            );
        }
        let mut long = body.to_vec();
        long.push(0);
        assert_eq!(Request::decode(&long).1, Err(DecodeError::Trailing(1)));
    }
}

#[test]
fn responses_round_trip() {
    let info = ChunkInfo {
        hydrated: true,
        user_written: 1 << 100 | 5,
        generation: 42,
        last_epoch: 6,
    };
    let cases = vec![
        Ok(Response::Done),
        Ok(Response::Stat(VolumeStat {
            size: 1 << 40,
            hydrating: false,
            open_mark: 3,
            paused: true,
            unhydrated: 11,
        })),
        Ok(Response::Data(Bytes::from_static(b"abc"))),
        Ok(Response::Skipped(u128::MAX)),
        Ok(Response::Chunk(info)),
        Ok(Response::MarkId(7)),
        Ok(Response::MarkChunk {
            info,
            data: Bytes::from_static(b"xyz"),
        }),
        Ok(Response::Chunks(vec![1, 5, 9])),
        Ok(Response::Digest {
            info,
            digest: [7; 32],
        }),
        Err((ErrorCode::OutOfRange, "offset 9 beyond".to_owned())),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        let f = encode_response(i as u64, &c);
        assert_eq!(decode_response(&f[4..]), Ok((i as u64, c.clone())));
        assert_eq!(
            decode_response_bytes(&f.slice(4..)),
            Ok((i as u64, c.clone()))
        );
        for cut in 0..f.len() - 4 {
            assert!(decode_response(&f[4..4 + cut]).is_err());
        }
    }
}

#[test]
fn bad_fields() {
    let mut f = Request::Read {
        volume: vol(),
        offset: 0,
        len: 4096,
    }
    .encode(1)
    .to_vec();
    f[12] = 99; // opcode
    assert_eq!(
        Request::decode(&f[4..]).1,
        Err(DecodeError::UnknownOpcode(99))
    );
    let mut f = Request::StatVolume { volume: vol() }.encode(1).to_vec();
    f[15] = b'X'; // inside the volume id
    assert!(matches!(
        Request::decode(&f[4..]).1,
        Err(DecodeError::BadField {
            field: "volume",
            ..
        })
    ));
    let mut f = Request::Write {
        volume: vol(),
        offset: 0,
        fua: false,
        data: Bytes::new(),
    }
    .encode(1)
    .to_vec();
    let n = f.len();
    f[n - 5] = 2; // fua
    assert!(matches!(
        Request::decode(&f[4..]).1,
        Err(DecodeError::BadField { field: "fua", .. })
    ));
    assert_eq!(Request::decode(&[1, 2, 3]).0, None);
    assert!(check_frame_len(MAX_FRAME + 1).is_err());
    assert_eq!(
        decode_hello(&encode_hello(PROTOCOL_VERSION)[4..]),
        Ok(PROTOCOL_VERSION)
    );
    assert!(decode_hello(b"GET / HTTP/1.1\r\n").is_err());
}

proptest! {
    #[test]
    fn decoders_are_total(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Request::decode(&body);
        let _ = decode_response(&body);
        let _ = decode_hello(&body);
    }

    #[test]
    fn write_round_trip(offset: u64, fua: bool, data in proptest::collection::vec(any::<u8>(), 0..5000), id: u64) {
        let req = Request::Write { volume: vol(), offset, fua, data: Bytes::from(data) };
        let f = req.encode(id);
        prop_assert_eq!(Request::decode(&f[4..]), (Some(id), Ok(req)));
    }
}

#[test]
fn authorize_fields_are_bounded() {
    let long = "x".repeat(MAX_AUTH_FIELD + 1);
    let frame = Request::Authorize {
        volume: None,
        rights: rights::READ,
        holder: long,
        token: "t".into(),
    }
    .encode(9);
    let (id, r) = Request::decode(&frame[4..]);
    assert_eq!(id, Some(9));
    assert!(
        matches!(
            r,
            Err(DecodeError::BadField {
                field: "holder",
                ..
            })
        ),
        "{r:?}"
    );
}
