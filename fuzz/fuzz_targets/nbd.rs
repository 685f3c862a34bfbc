//! The NBD option and request parsers on arbitrary bytes: never a panic, and a parsed export
//! name lies inside the input.
#![no_main]

use blockfleet_nbd::{parse_info_request, RequestHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(name) = parse_info_request(data) {
        assert!(name.len() + 6 <= data.len());
    }
    if let Ok(h) = <&[u8; 28]>::try_from(data.get(..28).unwrap_or_default()) {
        let _ = RequestHeader::decode(h);
    }
});
