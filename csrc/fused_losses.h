// The fused proxy-loss ops: loss and both gradients from one forward (SPEC §7).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace dmlfast {

// (loss: scalar in the accumulation dtype (float64 if an input is float64, else float32),
//  dL/d embeddings: like embeddings, dL/d proxies: like proxies).
using LossAndGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Proxy-Anchor (SPEC §1.1): mean over proxies with positives of LSE0(-alpha (S - margin)) plus
// the sum over all C proxies of LSE0(alpha (S + margin)) over negatives, divided by C.
LossAndGrads proxy_anchor_loss(const at::Tensor& embeddings, const at::Tensor& proxies,
                               const at::Tensor& labels, double margin, double alpha);

// Softmax cross-entropy over logits scale * cos(x, p) with label smoothing, or the classic
// ProxyNCA form with the target excluded from the denominator (SPEC §2, §7.3).
LossAndGrads proxy_nca_loss(const at::Tensor& embeddings, const at::Tensor& proxies,
                            const at::Tensor& labels, double scale, double smoothing,
                            bool exclude_positive);

}  // namespace dmlfast
