//! lb-agent: turns Services and EndpointSlices into the lb datapath's maps.
//!
//! Pure cores: [`model`] (Kubernetes objects → frontends), [`maglev`] (tables), [`sync`]
//! (desired state → map writes), [`alloc`]. Layers that touch the outside: [`manifests`] (files),
//! [`datapath`] (the kernel).

pub mod agent;
pub mod alloc;
pub mod datapath;
pub mod dump;
pub mod inspect;
pub mod kube_source;
pub mod maglev;
pub mod manifests;
pub mod metrics;
pub mod mock_api;
pub mod model;
pub mod netlink;
pub mod sync;
pub mod testbed;
