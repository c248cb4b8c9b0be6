//! A usbmuxd provider for idevice with `TCP_NODELAY` (shared by the tests and the bench).

use idevice::provider::IdeviceProvider;
use idevice::usbmuxd::UsbmuxdConnection;

/// idevice's own usbmuxd provider leaves Nagle's algorithm on for TCP usbmuxd, and it
/// writes each message's length and body separately: every request then waits for the
/// device's delayed ACK (40 ms). This provider is the same with `TCP_NODELAY`, as the
/// agent's is.
#[derive(Debug)]
pub struct NoDelayProvider {
    pub addr: std::net::SocketAddr,
    pub device_id: u32,
    pub udid: String,
}

impl NoDelayProvider {
    async fn mux(addr: std::net::SocketAddr) -> Result<UsbmuxdConnection, idevice::IdeviceError> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(UsbmuxdConnection::new(Box::new(stream), 1))
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, idevice::IdeviceError>> + Send>>;

impl IdeviceProvider for NoDelayProvider {
    fn connect(&self, port: u16) -> BoxFuture<idevice::Idevice> {
        let (addr, device_id) = (self.addr, self.device_id);
        Box::pin(async move { Self::mux(addr).await?.connect_to_device(device_id, port, "virtual-iphone-test").await })
    }

    fn label(&self) -> &str {
        "virtual-iphone-test"
    }

    fn get_pairing_file(&self) -> BoxFuture<idevice::pairing_file::PairingFile> {
        let (addr, udid) = (self.addr, self.udid.clone());
        Box::pin(async move { Self::mux(addr).await?.get_pair_record(&udid).await })
    }
}
