//! Maps shared by every program of the object.

use agent_common::{Lost, LOST_SLOTS};
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};

/// Every record for userspace. 256 KiB holds ~190 exec records: at 2,000 execs/s and a 10 ms
/// drain, ~20 are in flight. Userspace resizes it (`--ring-buffer-bytes`) before load.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU counts of records that could not be sent or counted, by [`Lost`] slot.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

/// Tgids of the LLM processes userspace tracks (value unused). Userspace sizes it to
/// `--max-processes` before load and inserts/removes entries as processes come and go.
#[map]
pub static TRACKED: HashMap<u32, u32> = HashMap::with_max_entries(8192, 0);

pub fn count_lost(kind: Lost) {
    if let Some(counter) = LOST.get_ptr_mut(kind as u32) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU, one at a time.
        unsafe { *counter += 1 };
    }
}
