// Forward and backward passes of a tanh multilayer perceptron with a mean-squared-error
// loss, for examples/train_mlp. Matrices are row-major: activations [batch, width], a
// layer's kernel [inputs, outputs] (Keras' Dense layout), its bias [outputs]. Kernels
// and biases are bound through the optimizer's tensor views (parameters to read,
// gradients to write), so the gradients land where the optimizer steps them.

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
@group(0) @binding(1) var<storage, read> in0: array<f32>;
@group(0) @binding(2) var<storage, read> in1: array<f32>;
@group(0) @binding(3) var<storage, read> in2: array<f32>;
@group(0) @binding(4) var<storage, read_write> out0: array<f32>;
@group(0) @binding(5) var<storage, read_write> out1: array<f32>;

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
    out0[n] = in0[row * layer.inputs + i];
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
    var z = in2[j];
    for (var i = 0u; i < layer.inputs; i++) {
        z += in0[r * layer.inputs + i] * in1[i * layer.outputs + j];
    }
    if layer.hidden != 0u {
        z = tanh(z);
    }
    out0[n] = z;
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
        let d = in0[n] - in1[n];
        out0[n] = scale * d;
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
        out1[0] = partial[0] / f32(count);
    }
}

// in0: a_in [batch, inputs], in1: delta [batch, outputs] (d loss / d pre-activation);
// out0: kernel gradient [inputs, outputs], out1: bias gradient [outputs].
@compute @workgroup_size(GROUP)
fn parameter_gradients(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = index(id, nwg);
    if n >= (layer.inputs + 1u) * layer.outputs {
        return;
    }
    let i = n / layer.outputs;
    let j = n % layer.outputs;
    var g = 0.0;
    if i < layer.inputs {
        for (var r = 0u; r < layer.batch; r++) {
            g += in0[r * layer.inputs + i] * in1[r * layer.outputs + j];
        }
        out0[n] = g;
    } else {
        for (var r = 0u; r < layer.batch; r++) {
            g += in1[r * layer.outputs + j];
        }
        out1[j] = g;
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
        s += in0[r * layer.outputs + j] * in1[i * layer.outputs + j];
    }
    let a = in2[n];
    out0[n] = s * (1.0 - a * a);
}
