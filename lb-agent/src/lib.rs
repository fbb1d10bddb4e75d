//! lb-agent: turns Services, EndpointSlices and this node into the lb datapath's maps.
//!
//! A change travels one way: [`source`] (the API server or a folder of manifests) → [`agent`] →
//! [`model`] (pure: Kubernetes objects → frontends and Maglev tables) → [`reconcile`] (pure:
//! desired state → ordered map writes, and the one encoder between model and map types) →
//! [`datapath`] (the kernel: load, attach, pins, the maps). [`inspect`] reads the pinned maps for
//! `lbctl` and the metrics; [`metrics`] serves them, and [`health`] the health endpoints and the
//! health-check node ports. [`host`] reads this
//! host's interface addresses (where NodePorts may listen).
//!
//! Without the `agent` feature (lbctl's build) the library has no source, agent or HTTP server:
//! no Kubernetes client and no axum.

#[cfg(feature = "agent")]
pub mod agent;
pub mod datapath;
#[cfg(feature = "agent")]
pub mod health;
pub mod host;
pub mod inspect;
#[cfg(feature = "agent")]
pub mod metrics;
pub mod model;
pub mod reconcile;
#[cfg(feature = "agent")]
pub mod source;
