//! `ferry.admin.v1.AdminService` over gRPC.

use ferry_proto::admin as pb;
use ferry_proto::admin::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use crate::service::Action;
use crate::{Admin, Error};

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::BadRequest(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::Conflict(m) => Status::already_exists(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Internal(m) => Status::internal(m),
        }
    }
}

/// The gRPC face of [`Admin`].
pub struct AdminGrpc(pub Admin);

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn set_state(&self, r: Request<pb::SetStateRequest>) -> Reply<pb::SetStateResponse> {
        self.0.set_state(r.into_inner()).await?;
        Ok(Response::new(pb::SetStateResponse {}))
    }

    async fn query(&self, r: Request<pb::QueryRequest>) -> Reply<pb::QueryResponse> {
        let answer = self.0.query(&r.into_inner().query).await?;
        let json = answer.to_json().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::QueryResponse {
            columns: answer.schema.fields().iter().map(|f| f.name().clone()).collect(),
            json: String::from_utf8(json).map_err(|e| Status::internal(e.to_string()))?,
        }))
    }

    async fn get_version(&self, _: Request<pb::GetVersionRequest>) -> Reply<pb::VersionInfo> {
        Ok(Response::new(self.0.version()))
    }

    async fn register_deployment(
        &self,
        r: Request<pb::RegisterDeploymentRequest>,
    ) -> Reply<pb::RegisterDeploymentResponse> {
        Ok(Response::new(self.0.register_deployment(r.into_inner()).await?))
    }

    async fn list_deployments(&self, _: Request<pb::ListDeploymentsRequest>) -> Reply<pb::ListDeploymentsResponse> {
        Ok(Response::new(self.0.list_deployments()))
    }

    async fn get_deployment(&self, r: Request<pb::GetDeploymentRequest>) -> Reply<pb::Deployment> {
        Ok(Response::new(self.0.get_deployment(&r.into_inner().id)?))
    }

    async fn remove_deployment(&self, r: Request<pb::RemoveDeploymentRequest>) -> Reply<pb::RemoveDeploymentResponse> {
        self.0.remove_deployment(&r.into_inner().id).await?;
        Ok(Response::new(pb::RemoveDeploymentResponse {}))
    }

    async fn list_services(&self, _: Request<pb::ListServicesRequest>) -> Reply<pb::ListServicesResponse> {
        Ok(Response::new(self.0.list_services()))
    }

    async fn modify_service(&self, r: Request<pb::ModifyServiceRequest>) -> Reply<pb::Service> {
        Ok(Response::new(self.0.modify_service(r.into_inner()).await?))
    }

    async fn get_service(&self, r: Request<pb::GetServiceRequest>) -> Reply<pb::Service> {
        Ok(Response::new(self.0.get_service(&r.into_inner().name)?))
    }

    async fn create_subscription(&self, r: Request<pb::CreateSubscriptionRequest>) -> Reply<pb::Subscription> {
        Ok(Response::new(self.0.create_subscription(r.into_inner()).await?))
    }

    async fn list_subscriptions(
        &self,
        r: Request<pb::ListSubscriptionsRequest>,
    ) -> Reply<pb::ListSubscriptionsResponse> {
        Ok(Response::new(self.0.list_subscriptions(r.get_ref())))
    }

    async fn get_subscription(&self, r: Request<pb::GetSubscriptionRequest>) -> Reply<pb::Subscription> {
        Ok(Response::new(self.0.get_subscription(&r.into_inner().id)?))
    }

    async fn delete_subscription(
        &self,
        r: Request<pb::DeleteSubscriptionRequest>,
    ) -> Reply<pb::DeleteSubscriptionResponse> {
        let request = r.into_inner();
        self.0.delete_subscription(&request.id, request.skip_drain).await?;
        Ok(Response::new(pb::DeleteSubscriptionResponse {}))
    }

    async fn pause_subscription(&self, r: Request<pb::PauseSubscriptionRequest>) -> Reply<pb::Subscription> {
        Ok(Response::new(self.0.pause_subscription(&r.into_inner().id, true).await?))
    }

    async fn resume_subscription(&self, r: Request<pb::ResumeSubscriptionRequest>) -> Reply<pb::Subscription> {
        Ok(Response::new(self.0.pause_subscription(&r.into_inner().id, false).await?))
    }

    async fn list_kafka_clusters(
        &self,
        _: Request<pb::ListKafkaClustersRequest>,
    ) -> Reply<pb::ListKafkaClustersResponse> {
        Ok(Response::new(self.0.list_kafka_clusters()))
    }

    async fn get_kafka_cluster(&self, r: Request<pb::GetKafkaClusterRequest>) -> Reply<pb::KafkaCluster> {
        Ok(Response::new(self.0.get_kafka_cluster(&r.into_inner().name)?))
    }

    async fn create_kafka_cluster(&self, r: Request<pb::CreateKafkaClusterRequest>) -> Reply<pb::KafkaCluster> {
        Ok(Response::new(self.0.create_kafka_cluster(r.into_inner()).await?))
    }

    async fn update_kafka_cluster(&self, r: Request<pb::UpdateKafkaClusterRequest>) -> Reply<pb::KafkaCluster> {
        Ok(Response::new(self.0.update_kafka_cluster(r.into_inner()).await?))
    }

    async fn delete_kafka_cluster(
        &self,
        r: Request<pb::DeleteKafkaClusterRequest>,
    ) -> Reply<pb::DeleteKafkaClusterResponse> {
        let r = r.into_inner();
        self.0.delete_kafka_cluster(&r.name, r.force).await?;
        Ok(Response::new(pb::DeleteKafkaClusterResponse {}))
    }

    async fn list_invocations(&self, r: Request<pb::ListInvocationsRequest>) -> Reply<pb::ListInvocationsResponse> {
        Ok(Response::new(self.0.list_invocations(r.get_ref())?))
    }

    async fn get_invocation(&self, r: Request<pb::GetInvocationRequest>) -> Reply<pb::Invocation> {
        Ok(Response::new(self.0.get_invocation(&r.into_inner().id)?))
    }

    async fn cancel_invocation(&self, r: Request<pb::InvocationActionRequest>) -> Reply<pb::InvocationActionResponse> {
        Ok(Response::new(self.0.act_on_invocation(&r.into_inner().id, Action::Cancel).await?))
    }

    async fn kill_invocation(&self, r: Request<pb::InvocationActionRequest>) -> Reply<pb::InvocationActionResponse> {
        Ok(Response::new(self.0.act_on_invocation(&r.into_inner().id, Action::Kill).await?))
    }

    async fn purge_invocation(&self, r: Request<pb::InvocationActionRequest>) -> Reply<pb::InvocationActionResponse> {
        Ok(Response::new(self.0.act_on_invocation(&r.into_inner().id, Action::Purge).await?))
    }

    async fn purge_invocation_journal(
        &self,
        r: Request<pb::InvocationActionRequest>,
    ) -> Reply<pb::InvocationActionResponse> {
        Ok(Response::new(self.0.act_on_invocation(&r.into_inner().id, Action::PurgeJournal).await?))
    }

    async fn resume_invocation(&self, r: Request<pb::InvocationActionRequest>) -> Reply<pb::InvocationActionResponse> {
        Ok(Response::new(self.0.act_on_invocation(&r.into_inner().id, Action::Resume).await?))
    }

    async fn pause_invocation(&self, r: Request<pb::InvocationActionRequest>) -> Reply<pb::InvocationActionResponse> {
        Ok(Response::new(self.0.act_on_invocation(&r.into_inner().id, Action::Pause).await?))
    }

    async fn restart_invocation_as_new(
        &self,
        r: Request<pb::InvocationActionRequest>,
    ) -> Reply<pb::RestartAsNewResponse> {
        Ok(Response::new(self.0.restart_as_new(&r.into_inner().id).await?))
    }

    async fn get_cluster_status(&self, request: Request<pb::GetClusterStatusRequest>) -> Reply<pb::ClusterStatus> {
        Ok(Response::new(self.0.cluster_status(request.get_ref())))
    }
}
