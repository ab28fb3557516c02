//! The GPU context: adapter choice, device, queue, and error capture so that wgpu
//! problems come back as [`Error::Gpu`] instead of panics.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::limits;
use crate::gpu::pipelines::{BlockReduction, PipelineCache};

/// Environment variable that lets [`crate::Backend::Auto`] pick a software adapter
/// (lavapipe, llvmpipe, WARP): `1`, `true` or `yes`. CI sets it so the GPU path runs
/// there.
pub(crate) const ALLOW_SOFTWARE_ENV: &str = "FUSED_RMSPROP_ALLOW_SOFTWARE_ADAPTER";

/// A wgpu device and queue, with the pipeline cache built on them. Cheap to clone.
///
/// Build one with [`GpuContext::new`], or wrap your own device with
/// [`GpuContext::from_device`] to share buffers with your training code.
#[derive(Clone)]
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    info: Option<wgpu::AdapterInfo>,
    instance: Option<wgpu::Instance>,
    pub(crate) pipelines: Arc<Mutex<PipelineCache>>,
    errors: Arc<Mutex<Vec<String>>>,
    /// Set once the device is lost; every later call then fails.
    lost: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.adapter_name())
            .finish()
    }
}

/// Whether the environment allows software adapters for `Auto`.
pub(crate) fn software_allowed_by_env() -> bool {
    std::env::var(ALLOW_SOFTWARE_ENV)
        .map(|v| matches!(v.trim(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

fn is_software(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
}

/// Why no adapter was found, where the crate runs.
#[cfg(not(target_arch = "wasm32"))]
const NO_ADAPTER: &str =
    "wgpu found no adapter (on Linux, install a Vulkan driver, e.g. mesa-vulkan-drivers)";
/// Why no adapter was found, where the crate runs.
#[cfg(target_arch = "wasm32")]
const NO_ADAPTER: &str =
    "this browser offers no WebGPU adapter (navigator.gpu is missing, or gave none)";

impl GpuContext {
    /// Finds an adapter and creates a device with WebGPU's default limits (what a
    /// browser gives), the storage-binding and buffer sizes raised to the adapter's
    /// (large models then need fewer segments). Hardware adapters come first (Vulkan,
    /// Metal and DX12 before GL); a software adapter is taken only when
    /// `allow_software` is true. `WGPU_BACKEND` (e.g. `gl`, `vulkan`) limits the
    /// backends searched. An adapter below what the kernels need is refused with
    /// [`Error::DeviceLimit`]. Blocks until the device exists (native only; in a
    /// browser, await [`GpuContext::new_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(allow_software: bool) -> Result<Self> {
        pollster::block_on(Self::new_async(allow_software))
    }

    /// [`GpuContext::new`] without blocking: what a browser needs (it creates devices
    /// through promises), and native code may await it too. In a browser the adapter is
    /// the page's WebGPU adapter (`navigator.gpu`); without WebGPU it is
    /// [`Error::NoAdapter`].
    pub async fn new_async(allow_software: bool) -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        let rank = |a: &wgpu::Adapter| {
            let info = a.get_info();
            let kind = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => 0,
                wgpu::DeviceType::IntegratedGpu => 1,
                wgpu::DeviceType::VirtualGpu | wgpu::DeviceType::Other => 2,
                wgpu::DeviceType::Cpu => 3,
            };
            let backend = if info.backend == wgpu::Backend::Gl {
                1
            } else {
                0
            };
            (kind, backend)
        };
        let found: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
            })
            .collect();
        let mut usable: Vec<wgpu::Adapter> = adapters
            .into_iter()
            .filter(|a| allow_software || !is_software(&a.get_info()))
            .collect();
        usable.sort_by_key(|a| rank(a));
        let Some(adapter) = usable.into_iter().next() else {
            let why = if found.is_empty() {
                NO_ADAPTER.to_string()
            } else {
                format!(
                    "only software adapters found ({}); allow them with {ALLOW_SOFTWARE_ENV}=1 or GpuOptions::allow_software",
                    found.join(", ")
                )
            };
            return Err(Error::NoAdapter(why));
        };
        let info = adapter.get_info();
        let required_limits = limits::requested(&adapter.limits());
        limits::check_device(&required_limits)?;
        let desc = wgpu::DeviceDescriptor {
            label: Some("fused-rmsprop"),
            required_features: wgpu::Features::empty(),
            required_limits,
            ..Default::default()
        };
        let (device, queue) = adapter
            .request_device(&desc)
            .await
            .map_err(|e| Error::Gpu(format!("cannot create a device on {}: {e}", info.name)))?;
        let mut ctx = Self::wrap(device, queue, Some(info))?;
        ctx.instance = Some(instance);
        Ok(ctx)
    }

    /// Wraps your own device and queue. Installs an uncaptured-error handler on the
    /// device that records errors (they are returned by the next optimizer call)
    /// instead of wgpu's default, which panics, and a device-lost callback that makes
    /// every later optimizer call fail (both replace handlers you set before).
    ///
    /// Every mode runs on a device made with `wgpu::Limits::downlevel_defaults()` (4
    /// storage buffers per stage, 16 KiB uniforms, 256 invocations per workgroup) or
    /// anything above it; a device below that is refused here with
    /// [`Error::DeviceLimit`], naming the limit (before any wgpu call could fail).
    ///
    /// ```
    /// use fused_rmsprop::GpuContext;
    /// # fn main() -> fused_rmsprop::Result<()> {
    /// let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    /// let adapter = match pollster::block_on(instance.request_adapter(&Default::default())) {
    ///     Ok(a) => a,
    ///     Err(e) if std::env::var_os("CI").is_none() => {
    ///         eprintln!("!!!!!! EXAMPLE SKIPPED: no GPU adapter ({e}) !!!!!!");
    ///         return Ok(());
    ///     }
    ///     Err(e) => panic!("CI is set but no GPU adapter: {e}"),
    /// };
    /// // the limits a wgpu program usually asks for: WebGPU's defaults
    /// let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
    ///     required_limits: wgpu::Limits::default(),
    ///     ..Default::default()
    /// })).expect("a device with WebGPU's default limits");
    /// let ctx = GpuContext::from_device(device, queue)?;
    /// # let _ = ctx;
    /// # Ok(()) }
    /// ```
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        Self::wrap(device, queue, None)
    }

    fn wrap(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: Option<wgpu::AdapterInfo>,
    ) -> Result<Self> {
        limits::check_device(&device.limits())?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut l) = lost_sink.lock() {
                l.get_or_insert(format!("the device was lost ({reason:?}): {message}"));
            }
        });
        let blocks = BlockReduction::for_adapter(&device.adapter_info());
        Ok(GpuContext {
            device,
            queue,
            info,
            instance: None,
            pipelines: Arc::new(Mutex::new(PipelineCache::new(blocks))),
            errors,
            lost,
        })
    }

    /// The adapter's name, or `"user device"` for a wrapped device.
    pub fn adapter_name(&self) -> String {
        self.info.as_ref().map_or_else(
            || "user device".to_string(),
            |i| format!("{} ({:?})", i.name, i.backend),
        )
    }

    /// Number of live wgpu buffers on this context's instance (for leak checks), when the
    /// context created its own instance; `None` for a wrapped device.
    pub fn live_buffers(&self) -> Option<usize> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let report = self.instance.as_ref()?.generate_report()?;
            Some(report.hub.buffers.num_allocated)
        }
        // the browser's WebGPU keeps no such report
        #[cfg(target_arch = "wasm32")]
        None
    }

    /// True when the adapter runs on the CPU (lavapipe, llvmpipe, WARP).
    pub fn is_software(&self) -> bool {
        self.info.as_ref().is_some_and(is_software)
    }

    /// Returns (and clears) the first error wgpu reported since the last check; a lost
    /// device is reported every time.
    pub(crate) fn take_error(&self) -> Result<()> {
        if let Some(why) = self.lost.lock().ok().and_then(|l| l.clone()) {
            return Err(Error::Gpu(why));
        }
        let mut errors = self
            .errors
            .lock()
            .map_err(|_| Error::Gpu("error log poisoned".into()))?;
        if errors.is_empty() {
            Ok(())
        } else {
            let first = errors.remove(0);
            errors.clear();
            Err(Error::Gpu(first))
        }
    }

    /// Runs `make` inside out-of-memory and validation error scopes, so that a buffer
    /// the device cannot hold comes back as an error. In a browser the scopes answer
    /// through promises, which cannot be waited for here: errors reach the
    /// uncaptured-error log instead, and the next readback or check reports them.
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn scoped<T>(&self, what: &str, make: impl FnOnce() -> T) -> Result<T> {
        let value = make();
        self.take_error()
            .map_err(|e| Error::Gpu(format!("{what}: {e}")))?;
        Ok(value)
    }

    /// Runs `make` inside out-of-memory and validation error scopes, so that a buffer
    /// the device cannot hold comes back as an error.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn scoped<T>(&self, what: &str, make: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = make();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = o.or(v) {
            return Err(Error::Gpu(format!("{what}: {e}")));
        }
        Ok(value)
    }

    /// Waits for submitted work; a lost device or timeout becomes an error (native
    /// only: a browser's device runs on its own, and its readbacks are awaited).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the device: {e}")))?;
        self.take_error()
    }
}
