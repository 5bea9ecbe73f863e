//! DNS answers as segproxy's resolver decodes them (hickory-proto), and re-encodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

use hickory_proto::op::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::from_vec(data) {
        let _ = message.to_vec();
        for answer in message.answers() {
            let _ = answer.data().ip_addr();
        }
    }
});
