//! Fuzzes the GGUF header parser: any byte string must give a header or an error, never a
//! panic, an out-of-bounds read or an unbounded allocation. When a header parses, every
//! tensor range it reports must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = sparrow::gguf::parse_header(data) {
        for t in &h.tensors {
            let end = h.data_offset + t.offset + t.n_bytes;
            assert!(end <= data.len() as u64, "tensor {} ends at {end} past {}", t.name, data.len());
        }
    }
});
