//! Serves the admin port: gRPC (`AdminService`, health, reflection) and the
//! REST gateway on one listener, told apart by path and content type.

use ferry_proto::admin::admin_service_server::AdminServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::grpc::AdminGrpc;
use crate::{rest, Admin};

/// Serves until `cancel` fires, then finishes in-flight requests.
pub async fn serve(listener: TcpListener, admin: Admin, cancel: CancellationToken) -> std::io::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServiceServer<AdminGrpc>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(std::io::Error::other)?;
    // gRPC paths are /<package>.<Service>/<method>; everything else is REST.
    let app = tonic::service::Routes::new(AdminServiceServer::new(AdminGrpc(admin.clone())))
        .add_service(health_service)
        .add_service(reflection)
        .into_axum_router()
        .fallback_service(rest::router(admin));
    axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await
}
