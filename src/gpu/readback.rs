//! Reading device buffers back without blocking: a [`Reads`] lists byte ranges to copy
//! and what to make of their bytes; [`Reads::start`] copies them all into staging
//! buffers in one submission and returns a [`Staged`] value that native code waits for
//! and a browser awaits (WebGPU maps buffers through promises, so its thread must
//! return to the event loop before the bytes exist).

use futures_channel::oneshot;

use crate::backend::{Arrival, Arriving, Staged};
use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;

/// One range to copy: `len` bytes of `buffer` from byte `offset` (a multiple of 4).
struct Copy {
    buffer: wgpu::Buffer,
    offset: u64,
    len: usize,
}

/// The bytes of each copy, in order, as [`Reads`]' finishers take them.
type Bytes = std::vec::IntoIter<Vec<u8>>;

/// What a [`Reads`] makes of its copies' bytes (taking its own, in order).
type Finish<T> = Box<dyn FnOnce(&mut Bytes) -> Result<T> + Send>;

/// Ranges of device buffers to read back, and the value their bytes make.
pub(crate) struct Reads<T> {
    copies: Vec<Copy>,
    finish: Finish<T>,
}

impl Reads<Vec<u8>> {
    /// `len` bytes of `buffer` from byte `offset` (a multiple of 4).
    pub(crate) fn copy(buffer: &wgpu::Buffer, offset: u64, len: usize) -> Self {
        Reads {
            copies: vec![Copy {
                buffer: buffer.clone(),
                offset,
                len,
            }],
            finish: Box::new(|bytes| {
                bytes
                    .next()
                    .ok_or_else(|| Error::Gpu("a readback lost one of its copies".into()))
            }),
        }
    }
}

impl<T: Send + 'static> Reads<T> {
    /// The value transformed by `f`.
    pub(crate) fn map<U: Send + 'static>(
        self,
        f: impl FnOnce(T) -> Result<U> + Send + 'static,
    ) -> Reads<U> {
        let finish = self.finish;
        Reads {
            copies: self.copies,
            finish: Box::new(move |bytes| f(finish(bytes)?)),
        }
    }

    /// Both values, read in the same submission.
    pub(crate) fn and<U: Send + 'static>(mut self, other: Reads<U>) -> Reads<(T, U)> {
        let (first, second) = (self.finish, other.finish);
        self.copies.extend(other.copies);
        Reads {
            copies: self.copies,
            finish: Box::new(move |bytes| Ok((first(bytes)?, second(bytes)?))),
        }
    }

    /// Every value, in order, read in one submission.
    pub(crate) fn all(reads: Vec<Reads<T>>) -> Reads<Vec<T>> {
        let mut copies = Vec::new();
        let mut finishers = Vec::with_capacity(reads.len());
        for r in reads {
            copies.extend(r.copies);
            finishers.push(r.finish);
        }
        Reads {
            copies,
            finish: Box::new(move |bytes| finishers.into_iter().map(|f| f(bytes)).collect()),
        }
    }

    /// Records every copy into staging buffers (each within the device's buffer size),
    /// submits them once and starts mapping them.
    pub(crate) fn start(self, ctx: &GpuContext) -> Result<Staged<T>> {
        let finish = self.finish;
        if self.copies.is_empty() {
            return Ok(Staged::ready(finish(&mut Vec::new().into_iter())?));
        }
        let max = ctx.device.limits().max_buffer_size;
        // (staging size, the copies it holds with their offsets in it)
        let mut plan: Vec<(u64, Vec<(usize, u64)>)> = Vec::new();
        for (i, c) in self.copies.iter().enumerate() {
            let size = (c.len as u64).next_multiple_of(4).max(4);
            match plan.last_mut() {
                Some((used, list)) if *used + size <= max => {
                    list.push((i, *used));
                    *used += size;
                }
                _ => plan.push((size, vec![(i, 0)])),
            }
        }
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        let mut stagings = Vec::with_capacity(plan.len());
        for (size, list) in plan {
            let buffer = ctx.scoped("allocating a readback buffer", || {
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })?;
            let mut ranges = Vec::with_capacity(list.len());
            for (i, at) in list {
                let c = &self.copies[i];
                let size = (c.len as u64).next_multiple_of(4).max(4);
                encoder.copy_buffer_to_buffer(&c.buffer, c.offset, &buffer, at, size);
                ranges.push((at as usize, c.len));
            }
            stagings.push((buffer, ranges));
        }
        ctx.queue.submit([encoder.finish()]);
        let stagings = stagings
            .into_iter()
            .map(|(buffer, ranges)| {
                let (tx, mapped) = oneshot::channel();
                buffer.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send(r);
                });
                Staging {
                    buffer,
                    ranges,
                    mapped,
                }
            })
            .collect();
        ctx.take_error()?;
        let pending = Pending {
            ctx: ctx.clone(),
            stagings,
        };
        Ok(Staged::new(Box::new(pending), move |bytes| {
            finish(&mut bytes.into_iter())
        }))
    }
}

/// A staging buffer being mapped, and where each copy sits in it.
struct Staging {
    buffer: wgpu::Buffer,
    ranges: Vec<(usize, usize)>,
    mapped: oneshot::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

impl Staging {
    /// The copies' bytes, once mapped.
    fn bytes(self, mapped: Result<()>) -> Result<Vec<Vec<u8>>> {
        mapped?;
        let out = {
            let view = self
                .buffer
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("reading a readback buffer: {e}")))?;
            self.ranges
                .iter()
                .map(|&(at, len)| view[at..at + len].to_vec())
                .collect()
        };
        self.buffer.unmap();
        Ok(out)
    }
}

/// What a mapping callback delivered: the map's outcome, or the callback dropped (a
/// lost device).
fn mapped(
    r: std::result::Result<std::result::Result<(), wgpu::BufferAsyncError>, oneshot::Canceled>,
) -> Result<()> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Gpu(format!("mapping a readback buffer: {e}"))),
        Err(_) => Err(Error::Gpu(
            "a readback never completed (the device was lost)".into(),
        )),
    }
}

/// Staging buffers in flight.
struct Pending {
    ctx: GpuContext,
    stagings: Vec<Staging>,
}

impl Arrival for Pending {
    #[cfg(not(target_arch = "wasm32"))]
    fn wait(self: Box<Self>) -> Result<Vec<Vec<u8>>> {
        self.ctx.wait()?;
        let mut out = Vec::new();
        for mut s in self.stagings {
            // another thread polling the same device may be the one firing the callback
            let r = mapped(pollster::block_on(&mut s.mapped));
            out.extend(s.bytes(r)?);
        }
        self.ctx.take_error()?;
        Ok(out)
    }

    fn arrive(self: Box<Self>) -> Arriving {
        Box::pin(async move {
            // native devices deliver only when polled; the browser's on its own
            #[cfg(not(target_arch = "wasm32"))]
            self.ctx.wait()?;
            let mut out = Vec::new();
            for mut s in self.stagings {
                let r = mapped((&mut s.mapped).await);
                out.extend(s.bytes(r)?);
            }
            self.ctx.take_error()?;
            Ok(out)
        })
    }
}
