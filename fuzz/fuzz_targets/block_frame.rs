//! The block protocol's decoders on arbitrary bytes: never a panic, and a request that
//! decodes re-encodes to the same body.
#![no_main]

use blockfleet_proto::wire::{decode_hello, decode_response, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_hello(data);
    let _ = decode_response(data);
    if let (Some(id), Ok(req)) = Request::decode(data) {
        let frame = req.encode(id);
        assert_eq!(&frame[4..], data, "decode/encode round trip");
    }
});
