//! Device buffers for what a batched launch reads besides the rows: its job descriptors and
//! slot mappings, copied from the host on the launch's stream just before it
//! (`Backend::copy_from_host_on`), so the kernel sees them whatever kind of stream it runs on.
//!
//! A buffer is reused only once the event recorded after its last launch has completed, so a
//! step never overwrites the descriptors a kernel queued by an earlier step may still be
//! reading, and no call waits for the device: while earlier buffers are in flight a new one is
//! allocated (a few at most, as a stream runs a step's launches in order).
//!
//! The host bytes of the copy are held as long as the device buffer: the driver documents a
//! pageable asynchronous copy only as one that "might be synchronous" with the host, so the
//! source stays alive and unchanged until the event says the copy, too, is done.

use crate::backend::{Backend, DevicePtr, Event, Stream};
use crate::error::Result;

/// Smallest buffer allocated, so that small steps share one size.
const MIN_BYTES: usize = 4096;

#[derive(Debug)]
struct Buf {
    ptr: DevicePtr,
    size: usize,
    /// Recorded after the last launch that reads the buffer; `None`: idle.
    event: Option<Event>,
    /// The host source of the copy into the buffer, kept until `event` completes.
    host: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Staging {
    bufs: Vec<Buf>,
}

/// A buffer taken for one call: fill it, launch, then `Staging::in_flight`.
#[derive(Clone, Copy, Debug)]
pub struct Taken {
    index: usize,
    pub ptr: DevicePtr,
}

impl Staging {
    /// An idle buffer of at least `bytes`, allocating one when none is.
    pub fn take(&mut self, b: &dyn Backend, bytes: usize) -> Result<Taken> {
        for buf in &mut self.bufs {
            if let Some(e) = buf.event {
                if b.event_done(e).unwrap_or(false) {
                    b.event_release(e);
                    buf.event = None;
                    buf.host = Vec::new();
                }
            }
        }
        let fits = self
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, buf)| buf.event.is_none() && buf.size >= bytes)
            .min_by_key(|(_, buf)| buf.size)
            .map(|(i, _)| i);
        if let Some(index) = fits {
            return Ok(Taken {
                index,
                ptr: self.bufs[index].ptr,
            });
        }
        let size = bytes.max(MIN_BYTES).next_power_of_two();
        let ptr = b.alloc(size)?;
        self.bufs.push(Buf {
            ptr,
            size,
            event: None,
            host: Vec::new(),
        });
        Ok(Taken {
            index: self.bufs.len() - 1,
            ptr,
        })
    }

    /// Marks `t` busy until `stream` passes this point, holding `host` (the bytes copied into
    /// it) as long. Without an event the device is synchronized instead, so the buffer is idle
    /// either way.
    pub fn in_flight(&mut self, b: &dyn Backend, t: Taken, stream: Stream, host: Vec<u8>) {
        let buf = &mut self.bufs[t.index];
        match b.event_record(stream) {
            Ok(e) => {
                buf.event = Some(e);
                buf.host = host;
            }
            Err(_) => {
                let _ = b.synchronize();
            }
        }
    }

    /// Buffers held now (busy or idle).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.bufs.len()
    }

    /// Host bytes held for copies whose buffers are in flight.
    #[cfg(test)]
    pub fn held_host_bytes(&self) -> usize {
        self.bufs.iter().map(|buf| buf.host.len()).sum()
    }

    /// Gives every buffer back; the caller synchronized first.
    pub fn release(&mut self, b: &dyn Backend) {
        for buf in self.bufs.drain(..) {
            if let Some(e) = buf.event {
                b.event_release(e);
            }
            let _ = b.free(buf.ptr, buf.size);
        }
    }
}
