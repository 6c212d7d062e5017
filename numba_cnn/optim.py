"""Adam, as Keras 3 defines it (keras.optimizers.Adam, amsgrad off).

At step t (counted from 1): alpha = lr * sqrt(1 - beta2^t) / (1 - beta1^t), then for every parameter
m += (g - m)(1 - beta1), v += (g^2 - v)(1 - beta2), p -= alpha * m / (sqrt(v) + eps). Keras adds eps to sqrt(v)
without a bias correction, which is why its default eps (1e-7) differs from the paper's 1e-8.
"""

import math

import numpy as np


class Adam:
    def __init__(self, params, backend, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-7):
        self.params = params  # name -> array, updated in place
        self.layers = backend.layers  # supplies adam_update; the moments are the backend's arrays (zeros_like)
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(beta1), float(beta2), float(eps)
        self.m = {name: backend.zeros_like(p) for name, p in params.items()}
        self.v = {name: backend.zeros_like(p) for name, p in params.items()}
        self.iterations = 0

    def step(self, grads):
        t = self.iterations + 1
        alpha = self.lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        for name, p in self.params.items():
            self.layers.adam_update(p, grads[name], self.m[name], self.v[name], alpha, self.beta1, self.beta2,
                                    self.eps)
        self.iterations = t

    def state_dict(self, to_host):
        """Both moments per parameter (host copies) and the step count."""
        state = {"iterations": np.int64(self.iterations)}
        for name in self.params:
            state[f"m.{name}"] = np.array(to_host(self.m[name]))
            state[f"v.{name}"] = np.array(to_host(self.v[name]))
        return state

    def load_state_dict(self, state, to_device):
        for name, p in self.params.items():
            for moment, store in (("m", self.m), ("v", self.v)):
                value = np.asarray(state[f"{moment}.{name}"])
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {moment}.{name} has shape {value.shape}, expected {p.shape}")
                store[name] = to_device(value.astype(p.dtype))
        self.iterations = int(state["iterations"])
