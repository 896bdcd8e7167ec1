from django.urls import path

from gateway import batches, files, stored, views, warm_path

urlpatterns = [
    path("chat/completions", views.chat_completions, name="chat-completions"),
    path("embeddings", views.embeddings, name="embeddings"),
    path("responses", warm_path.responses, name="responses"),
    path("responses/<str:response_id>", stored.response_detail, name="response-detail"),
    path("responses/<str:response_id>/cancel", stored.response_cancel, name="response-cancel"),
    path("responses/<str:response_id>/input_items", stored.response_input_items, name="response-input-items"),
    path("files", files.files, name="files"),
    path("files/<str:file_id>", files.file_detail, name="file-detail"),
    path("files/<str:file_id>/content", files.file_content, name="file-content"),
    path("batches", batches.batches, name="batches"),
    path("batches/<str:batch_id>", batches.batch_detail, name="batch-detail"),
    path("batches/<str:batch_id>/cancel", batches.batch_cancel, name="batch-cancel"),
    path("models", stored.models, name="models"),
    path("models/<path:alias>", stored.model_detail, name="model-detail"),
]
