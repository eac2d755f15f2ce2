//! Choosing where tensors live: `auto`, `cpu` or `gpu[:N]` (wgpu: Vulkan, Metal, DX12).

use std::fmt;
use std::str::FromStr;

use burn::tensor::{Device, DeviceKind};

/// A device request from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The best wgpu adapter (discrete, then integrated, then virtual), else the CPU backend.
    #[default]
    Auto,
    /// burn's CPU backend (flex).
    Cpu,
    /// The N-th wgpu GPU adapter, in the order [`gpu_adapters`] lists them.
    Gpu(usize),
}

/// Errors when parsing or resolving a device request.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The request is not `auto`, `cpu`, `gpu` or `gpu:N`.
    #[error("unknown device `{0}` (expected auto, cpu, gpu or gpu:N)")]
    Parse(String),
    /// No wgpu adapter has that index.
    #[error("no GPU adapter {index}: {found} found")]
    NoSuchGpu {
        /// The requested index.
        index: usize,
        /// How many adapters exist.
        found: usize,
    },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "gpu" => Ok(Self::Gpu(0)),
            _ => s
                .strip_prefix("gpu:")
                .and_then(|n| n.parse().ok())
                .map(Self::Gpu)
                .ok_or_else(|| DeviceError::Parse(s.into())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Gpu(n) => write!(f, "gpu:{n}"),
        }
    }
}

/// A wgpu adapter as the system reports it.
#[derive(Debug, Clone)]
pub struct GpuAdapter {
    /// Adapter name.
    pub name: String,
    /// Graphics API (Vulkan, Metal, Dx12, Gl).
    pub backend: String,
    /// Discrete, integrated, virtual or CPU (software rasteriser such as lavapipe).
    pub device_type: wgpu::DeviceType,
    /// Whether shaders may use f16.
    pub shader_f16: bool,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_buffer_binding_size: u64,
    /// burn's selector for this adapter.
    pub(crate) kind: DeviceKind,
}

/// GPU adapters wgpu finds, best first: discrete, integrated, virtual, then CPU (software) adapters.
pub fn gpu_adapters() -> Vec<GpuAdapter> {
    // Vulkan, Metal, DX12: the APIs burn's wgpu backend computes on (GL cannot run its compute shaders).
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    descriptor.backends = wgpu::Backends::PRIMARY;
    let instance = wgpu::Instance::new(descriptor);
    let mut adapters: Vec<GpuAdapter> = Vec::new();
    let mut per_type = [0usize; 4];
    for adapter in enumerate_adapters(&instance) {
        let info = adapter.get_info();
        let (slot, kind) = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => (0, DeviceKind::DiscreteGpu(per_type[0])),
            wgpu::DeviceType::IntegratedGpu => (1, DeviceKind::IntegratedGpu(per_type[1])),
            wgpu::DeviceType::VirtualGpu => (2, DeviceKind::VirtualGpu(per_type[2])),
            wgpu::DeviceType::Cpu => (3, DeviceKind::Cpu),
            wgpu::DeviceType::Other => continue,
        };
        if slot == 3 && per_type[3] > 0 {
            continue; // burn addresses a single CPU adapter.
        }
        per_type[slot] += 1;
        adapters.push(GpuAdapter {
            name: info.name,
            backend: format!("{:?}", info.backend),
            device_type: info.device_type,
            shader_f16: adapter.features().contains(wgpu::Features::SHADER_F16),
            max_storage_buffer_binding_size: adapter.limits().max_storage_buffer_binding_size,
            kind,
        });
    }
    adapters.sort_by_key(|a| match a.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        _ => 3,
    });
    adapters
}

fn enumerate_adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let future = instance.enumerate_adapters(wgpu::Backends::PRIMARY);
    block_on(future)
}

/// Minimal executor for wgpu's adapter enumeration future, which completes without real asynchrony on native.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

/// The device a request resolves to, with a description for logs.
pub fn resolve(choice: DeviceChoice) -> Result<(Device, String), DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::flex(), "cpu (flex)".into())),
        DeviceChoice::Auto => {
            let best = gpu_adapters()
                .into_iter()
                .find(|a| a.device_type != wgpu::DeviceType::Cpu);
            Ok(match best {
                Some(a) => (Device::wgpu(a.kind.clone()), describe(&a)),
                None => (Device::flex(), "cpu (flex; no GPU adapter found)".into()),
            })
        }
        DeviceChoice::Gpu(index) => {
            let adapters = gpu_adapters();
            let found = adapters.len();
            let a = adapters
                .into_iter()
                .nth(index)
                .ok_or(DeviceError::NoSuchGpu { index, found })?;
            Ok((Device::wgpu(a.kind.clone()), describe(&a)))
        }
    }
}

/// Whether the device a request resolves to computes in f16 natively (a GPU adapter with shader-f16); the CPU
/// backend emulates f16 and gains nothing from it.
pub fn fast_f16(choice: DeviceChoice) -> bool {
    match choice {
        DeviceChoice::Cpu => false,
        DeviceChoice::Auto => gpu_adapters()
            .into_iter()
            .find(|a| a.device_type != wgpu::DeviceType::Cpu)
            .is_some_and(|a| a.shader_f16),
        DeviceChoice::Gpu(index) => gpu_adapters().get(index).is_some_and(|a| a.shader_f16),
    }
}

fn describe(a: &GpuAdapter) -> String {
    format!("gpu {} ({}, {:?})", a.name, a.backend, a.device_type)
}

/// The first wgpu adapter, for tests of the GPU path (in CI: Mesa's lavapipe). Without one, `None` and one line on
/// stderr (past the test harness's capture) saying that `test` is skipped and why; with `OFFSITE_REQUIRE_GPU=1`
/// (set by CI) a missing adapter fails the test instead.
pub fn gpu_for_tests(test: &str) -> Option<Device> {
    match resolve(DeviceChoice::Gpu(0)) {
        Ok((device, _)) => Some(device),
        Err(e) if std::env::var("OFFSITE_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("{test}: OFFSITE_REQUIRE_GPU=1 but {e}")
        }
        Err(e) => {
            use std::io::Write;
            let line = format!(
                "skipped {test}: {e} (install Mesa's software Vulkan, e.g. apt-get install mesa-vulkan-drivers; \
                 OFFSITE_REQUIRE_GPU=1 makes this a failure)\n"
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_requests() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("gpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Gpu(0));
        assert_eq!("gpu:2".parse::<DeviceChoice>().unwrap(), DeviceChoice::Gpu(2));
        assert!("gpu:x"
            .parse::<DeviceChoice>()
            .unwrap_err()
            .to_string()
            .contains("gpu:x"));
    }
}
