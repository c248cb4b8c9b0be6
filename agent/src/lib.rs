//! lifeboat-agent: backs up iPhones attached to a workstation to a Lifeboat server.
//!
//! Today: the protocol client (`client`) and tree upload/download (`transfer`) that the
//! backup pipeline builds on. Device watching, MobileBackup2 and scheduling come next.

pub mod client;
pub mod transfer;
