// Forward and backward passes of a tanh multilayer perceptron with a mean-squared-error
// loss, for examples/train_mlp. Matrices are row-major: activations [batch, width], a
// layer's kernel [inputs, outputs] (Keras' Dense layout), its bias [outputs]. Kernels
// and biases are bound through the optimizer's tensor views (parameters to read,
// gradients to write), so the gradients land where the optimizer steps them.
//
// With BF16 (mixed precision), the kernels and biases are read from the optimizer's
// bf16 parameter copy (in1, in2: two per u32) and the parameter gradients are
// written in bf16 (out0, out1), rounded to nearest, ties to even, one pair of
// elements per invocation; activations and sums stay f32.

override BF16: bool = false;

struct Layer {
    batch: u32,
    inputs: u32,
    outputs: u32,
    // 1: tanh after this layer (hidden layers), 0: linear (the output layer)
    hidden: u32,
    // rows of the dataset, and the first row of this step's batch (gather only)
    samples: u32,
    start: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> layer: Layer;
// in1, in2, out0 and out1 hold f32 bits, or bf16 pairs (the kernel and bias, their
// gradients) with BF16, so one binding serves both and every entry point binds at most
// four storage buffers (WebGPU's downlevel limit; the host uses layout `auto`).
@group(0) @binding(1) var<storage, read> in0: array<f32>;
@group(0) @binding(2) var<storage, read> in1: array<u32>;
@group(0) @binding(3) var<storage, read> in2: array<u32>;
@group(0) @binding(4) var<storage, read_write> out0: array<u32>;
@group(0) @binding(5) var<storage, read_write> out1: array<u32>;

fn f(bits: u32) -> f32 {
    return bitcast<f32>(bits);
}

fn u(x: f32) -> u32 {
    return bitcast<u32>(x);
}

// Element k of a bf16 array held two per u32 (little end first), as f32.
fn bf16_at(word: u32, k: u32) -> f32 {
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (k & 1u) == 1u));
}

// f32 as bf16 bits, rounded to nearest, ties to even (finite values: gradients here).
fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// The layer's kernel element k and bias element j (in1 / in2, or their bf16 copies).
fn kernel(k: u32) -> f32 {
    if BF16 {
        return bf16_at(in1[k / 2u], k);
    }
    return f(in1[k]);
}

fn bias(j: u32) -> f32 {
    if BF16 {
        return bf16_at(in2[j / 2u], j);
    }
    return f(in2[j]);
}

const GROUP: u32 = 64u;

fn index(id: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return id.x + id.y * nwg.x * GROUP;
}

// in0: inputs [samples, inputs], in1: targets [samples, outputs]
// out0: batch inputs [batch, inputs], out1: batch targets [batch, outputs]
@compute @workgroup_size(GROUP)
fn gather(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = index(id, nwg);
    let r = n / layer.inputs;
    if r >= layer.batch {
        return;
    }
    let row = (layer.start + r) % layer.samples;
    let i = n % layer.inputs;
    out0[n] = u(in0[row * layer.inputs + i]);
    if i < layer.outputs {
        out1[r * layer.outputs + i] = in1[row * layer.outputs + i];
    }
}

// in0: a_in [batch, inputs], in1: kernel, in2: bias; out0: a_out [batch, outputs]
@compute @workgroup_size(GROUP)
fn forward(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = index(id, nwg);
    if n >= layer.batch * layer.outputs {
        return;
    }
    let r = n / layer.outputs;
    let j = n % layer.outputs;
    var z = bias(j);
    for (var i = 0u; i < layer.inputs; i++) {
        z += in0[r * layer.inputs + i] * kernel(i * layer.outputs + j);
    }
    if layer.hidden != 0u {
        z = tanh(z);
    }
    out0[n] = u(z);
}

var<workgroup> partial: array<f32, 256>;

// One workgroup of 256. in0: predictions [batch, outputs], in1: targets;
// out0: d loss / d predictions, out1[0]: the batch's mean squared error.
@compute @workgroup_size(256)
fn loss_gradient(@builtin(local_invocation_index) lid: u32) {
    let count = layer.batch * layer.outputs;
    let scale = 2.0 / f32(count);
    var sum = 0.0;
    for (var n = lid; n < count; n += 256u) {
        let d = in0[n] - f(in1[n]);
        out0[n] = u(scale * d);
        sum += d * d;
    }
    partial[lid] = sum;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride /= 2u) {
        if lid < stride {
            partial[lid] += partial[lid + stride];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        out1[0] = u(partial[0] / f32(count));
    }
}

// Gradient of kernel element k = i * outputs + j, and of bias element j.
fn kernel_gradient(k: u32) -> f32 {
    let i = k / layer.outputs;
    let j = k % layer.outputs;
    var g = 0.0;
    for (var r = 0u; r < layer.batch; r++) {
        g += in0[r * layer.inputs + i] * f(in1[r * layer.outputs + j]);
    }
    return g;
}

fn bias_gradient(j: u32) -> f32 {
    var g = 0.0;
    for (var r = 0u; r < layer.batch; r++) {
        g += f(in1[r * layer.outputs + j]);
    }
    return g;
}

// in0: a_in [batch, inputs], in1: delta [batch, outputs] (d loss / d pre-activation);
// out0: kernel gradient [inputs, outputs], out1: bias gradient [outputs] (with BF16,
// as bf16 pairs: invocation n writes the pair of elements 2n, 2n + 1, first of
// the kernel, then of the bias).
@compute @workgroup_size(GROUP)
fn parameter_gradients(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = index(id, nwg);
    let kernel_len = layer.inputs * layer.outputs;
    if BF16 {
        let kernel_pairs = (kernel_len + 1u) / 2u;
        if n < kernel_pairs {
            let k = 2u * n;
            let hi = select(0u, bf16_bits(kernel_gradient(k + 1u)), k + 1u < kernel_len);
            out0[n] = bf16_bits(kernel_gradient(k)) | (hi << 16u);
        } else if n < kernel_pairs + (layer.outputs + 1u) / 2u {
            let j = 2u * (n - kernel_pairs);
            let hi = select(0u, bf16_bits(bias_gradient(j + 1u)), j + 1u < layer.outputs);
            out1[n - kernel_pairs] = bf16_bits(bias_gradient(j)) | (hi << 16u);
        }
        return;
    }
    if n < kernel_len {
        out0[n] = u(kernel_gradient(n));
    } else if n < kernel_len + layer.outputs {
        out1[n - kernel_len] = u(bias_gradient(n - kernel_len));
    }
}

// in0: delta [batch, outputs], in1: kernel [inputs, outputs], in2: a_in [batch, inputs]
// (the previous layer's tanh output); out0: the previous layer's delta [batch, inputs].
@compute @workgroup_size(GROUP)
fn input_gradient(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = index(id, nwg);
    if n >= layer.batch * layer.inputs {
        return;
    }
    let r = n / layer.inputs;
    let i = n % layer.inputs;
    var s = 0.0;
    for (var j = 0u; j < layer.outputs; j++) {
        s += in0[r * layer.outputs + j] * kernel(i * layer.outputs + j);
    }
    let a = f(in2[n]);
    out0[n] = u(s * (1.0 - a * a));
}
