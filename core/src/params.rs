//! Parameter bookkeeping by checkpoint path: counts per part, and per-parameter gradient lookup.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor};

/// Calls `f(path, numel, grad_abs_sum)` for every float parameter of `module`.
/// `grad_abs_sum` is `None` when the parameter received no gradient at all.
pub fn for_each_param<M: Module>(module: &M, grads: Option<&Gradients>, mut f: impl FnMut(&str, usize, Option<f64>)) {
    let mut v = Collector { stack: Vec::new(), grads, f: &mut f };
    module.visit(&mut v);
}

struct Collector<'a, F: FnMut(&str, usize, Option<f64>)> {
    stack: Vec<String>,
    grads: Option<&'a Gradients>,
    f: &'a mut F,
}

impl<F: FnMut(&str, usize, Option<f64>)> ModuleVisitor for Collector<'_, F> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let grad = self.grads.and_then(|g| tensor.grad(g)).map(|g| g.abs().sum().into_scalar::<f32>() as f64);
        let path = dotted(&self.stack);
        (self.f)(&path, tensor.shape().num_elements(), grad);
    }
}

/// Draws every lazily initialised parameter of `module` now, in visiting order.
pub fn materialize<M: Module>(module: &M) {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

/// Parameter count of each top-level part of a module, in visiting order.
pub fn count_by_part<M: Module>(module: &M) -> Vec<(String, usize)> {
    let mut parts: Vec<(String, usize)> = Vec::new();
    for_each_param(module, None, |path, n, _| {
        let part = path.split('.').next().unwrap_or(path).to_string();
        match parts.last_mut() {
            Some((p, count)) if *p == part => *count += n,
            _ => parts.push((part, n)),
        }
    });
    parts
}

/// Every float parameter as (path, shape, its values flattened in row-major order), left on the device: for
/// reading them back asynchronously too (the browser cannot block on WebGPU).
pub fn named_flat<M: Module>(module: &M) -> Vec<(String, Vec<usize>, Tensor<1>)> {
    struct Flat(Vec<String>, Vec<(String, Vec<usize>, Tensor<1>)>);
    impl ModuleVisitor for Flat {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            let shape = t.dims().to_vec();
            let n = shape.iter().product::<usize>();
            self.1.push((dotted(&self.0), shape, t.reshape([n])));
        }
    }
    let mut v = Flat(Vec::new(), Vec::new());
    module.visit(&mut v);
    v.1
}

/// Every float parameter as (path, shape, values): for exporting weights under checkpoint names.
pub fn named_values<M: Module>(module: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    named_flat(module)
        .into_iter()
        .map(|(path, shape, t)| {
            let values = t.to_data().convert::<f32>().try_to_vec::<f32>().expect("f32 parameter data");
            (path, shape, values)
        })
        .collect()
}

/// The checkpoint key of a visitor's module stack (`Option` and the root add empty names).
pub fn dotted(stack: &[String]) -> String {
    stack.iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>().join(".")
}
